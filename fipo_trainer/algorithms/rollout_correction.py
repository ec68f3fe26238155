"""Rollout correction: importance weights π_old / π_rollout for the behaviour-policy gap.

The engine (vLLM) samples the responses from its own distribution π_rollout; the actor
recomputes the same tokens' log-probs, π_old, at the start of the update. The PPO ratio in
the losses is π_θ / π_old, so the loss is an estimate under π_old while the data came from
π_rollout. Numerical differences (kernels, precision) and, under asynchronous training,
stale weights make the two differ; these weights correct for it. They multiply the
per-token policy loss of any registered loss (``policy_loss.compute_policy_terms``).

Two levels and two threshold forms (issue 11, verl's rollout-correction semantics):

- ``level="token"``: w_t = exp(clamp(δ_t, ±20)), δ_t = log π_old(y_t) − log π_rollout(y_t).
- ``level="sequence"``: w_i = exp(clamp(Σ_t m_t δ_t, ±20)), the same for every token of
  response i (the ratio of the whole response's probabilities).
- ``threshold`` one number u: truncated IS (TIS), w ← min(w, u).
  ``threshold`` a pair (l, u), or the string ``"l_u"``: IcePop, w ← 0 outside [l, u].

Weights are detached constants (no gradient) and 0 on padding. Pure tensor functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fipo_trainer.algorithms.kl import kl_penalty
from fipo_trainer.algorithms.options import CORRECTION_LEVELS as LEVELS
from fipo_trainer.algorithms.options import DEFAULT_CORRECTION_THRESHOLD as DEFAULT_THRESHOLD
from fipo_trainer.algorithms.options import parse_threshold

__all__ = [
    "LEVELS",
    "LOG_RATIO_CLAMP",
    "compute_rollout_correction_weights",
    "parse_threshold",
    "rollout_mismatch_metrics",
]

LOG_RATIO_CLAMP = 20.0


def _raw_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Unthresholded IS ratios [B, L] (0 on padding)."""
    if level not in LEVELS:
        raise ValueError(f"rollout correction level must be one of {LEVELS}, got {level!r}")
    masked = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    if level == "sequence":
        masked = masked.sum(-1, keepdim=True).expand_as(log_ratio)
    return torch.exp(masked.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) * mask


@torch.no_grad()
def compute_rollout_correction_weights(
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    level: str = "token",
    threshold: float | str | Sequence[float] = DEFAULT_THRESHOLD,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weights [B, L] (detached, float32, 0 on padding) and ``rollout_corr/*`` metrics.

    ``log_ratio``: log π_old − log π_rollout per token [B, L] (the caller subtracts);
    ``response_mask``: 1 on response tokens. See the module doc for ``level`` and
    ``threshold``; the metrics are those of :func:`rollout_mismatch_metrics`.
    """
    if log_ratio.shape != response_mask.shape:
        raise ValueError(
            f"log_ratio shape {tuple(log_ratio.shape)} != response_mask shape "
            f"{tuple(response_mask.shape)}"
        )
    lower, upper = parse_threshold(threshold)
    log_ratio = log_ratio.detach().float()
    mask = response_mask.float()
    raw = _raw_weights(log_ratio, mask, level)
    if lower is None:  # TIS
        weights = raw.clamp(max=upper)
        changed = raw > upper
    else:  # IcePop
        changed = (raw < lower) | (raw > upper)
        weights = torch.where(changed, torch.zeros_like(raw), raw)
    weights = weights * mask
    return weights, _metrics(log_ratio, mask, raw, weights, changed)


def _metrics(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    raw: torch.Tensor,
    weights: torch.Tensor,
    changed: torch.Tensor,
) -> dict[str, float]:
    n = float(mask.sum())
    if n == 0:  # no response token: nothing mismatches
        names = ("kl_k1", "kl_k3", "clipped_frac")
        return {**{f"rollout_corr/{k}": 0.0 for k in names},
                "rollout_corr/ratio_max": 1.0, "rollout_corr/ess": 1.0}
    on = mask.bool()
    # KL(π_rollout || π_old) from tokens sampled by π_rollout: k1 = log π_rollout − log π_old.
    k1 = kl_penalty(-log_ratio, torch.zeros_like(log_ratio), "k1")
    k3 = kl_penalty(-log_ratio, torch.zeros_like(log_ratio), "k3")
    w_sum = float(weights[on].double().sum())
    w_sq = float(weights[on].double().square().sum())
    return {
        "rollout_corr/kl_k1": float(k1[on].double().mean()),
        "rollout_corr/kl_k3": float(k3[on].double().mean()),
        "rollout_corr/ratio_max": float(raw[on].max()),
        "rollout_corr/clipped_frac": float(changed[on].float().mean()),
        "rollout_corr/ess": w_sum * w_sum / (n * w_sq) if w_sq > 0 else 0.0,
    }


def rollout_mismatch_metrics(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    level: str = "token",
    threshold: float | str | Sequence[float] = DEFAULT_THRESHOLD,
) -> dict[str, float]:
    """The behaviour-vs-π_old mismatch over response tokens (logged every step, whether or
    not the correction is on; with it off, at the section's ``level``/``threshold``).

    With δ_t = log π_old(y_t) − log π_rollout(y_t) on the response tokens (N of them), all
    sampled by the engine, π_rollout:

    - ``rollout_corr/kl_k1``: mean of −δ_t, the k1 estimate of KL(π_rollout ‖ π_old).
    - ``rollout_corr/kl_k3``: mean of exp(δ_t) − δ_t − 1 (each token clamped to 10, as
      ``algorithms.kl``), the low-variance k3 estimate of the same KL; ≥ 0.
    - ``rollout_corr/ratio_max``: the largest IS ratio π_old/π_rollout before the threshold
      (per token, or per response at ``level="sequence"``), after the ±20 log clamp.
    - ``rollout_corr/clipped_frac``: fraction of response tokens whose weight the threshold
      changed (TIS: ratio > upper, truncated; IcePop: ratio outside [lower, upper], zeroed).
    - ``rollout_corr/ess``: normalised effective sample size (Σw)² / (N·Σw²) of the weights
      after the threshold, over response tokens; 1 when all weights are equal, 0 when all
      are zero.

    No response token at all: KLs and clipped_frac 0, ratio_max and ess 1.
    """
    log_ratio = old_log_prob.float() - rollout_log_prob.float()
    return compute_rollout_correction_weights(log_ratio, response_mask, level, threshold)[1]
