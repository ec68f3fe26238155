"""Policy losses: PPO/DAPO dual-clip ("vanilla") and FIPO ("fipo"), in an open registry.

A registered loss is a pure function of tensors that returns the *per-token* loss, the mask
it applies to and its metrics; `compute_policy_loss` aggregates it. Keeping aggregation out
of the losses lets a micro-batched update reproduce the full-batch loss exactly (pass the
mini-batch-wide `global_denominator`, see `aggregation.local_denominator`).

The FIPO loss follows FIPO_SPEC.md §1 point by point; comments cite the point numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fipo_trainer.algorithms.aggregation import AGG_MODES, aggregate_loss, masked_mean
from fipo_trainer.algorithms.future_kl import future_kl, gamma_from_half_life

LOG_RATIO_CLAMP = 20.0  # §1.1: δ is clamped to ±20 before exp


@dataclass
class PolicyLossConfig:
    """Hyper-parameters of the policy losses (defaults: the FIPO 32B recipe)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    loss_agg_mode: str = "token-mean"
    decay_rate: float = 32.0
    future_kl_clip_ratio: float = 0.2
    future_kl_clip_high_only: bool = True
    safety_thresh: float = 10.0
    # Constant length for "seq-mean-token-sum-norm" (Dr. GRPO); None = the tensor's length.
    loss_norm_length: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending key and the fix."""
        for key in ("clip_ratio_low", "clip_ratio_high", "future_kl_clip_ratio"):
            if getattr(self, key) < 0:
                raise ValueError(f"policy_loss.{key} must be >= 0, got {getattr(self, key)}")
        if self.clip_ratio_low >= 1:
            raise ValueError(
                f"policy_loss.clip_ratio_low must be < 1 (ratio clip floor 1 - eps), got {self.clip_ratio_low}"
            )
        if not self.clip_ratio_c > 1:
            raise ValueError(
                f"policy_loss.clip_ratio_c (dual-clip constant c) must be > 1, got {self.clip_ratio_c}; "
                "the recipes use 10.0"
            )
        if not self.decay_rate > 0:
            raise ValueError(
                f"policy_loss.decay_rate (Future-KL half-life in tokens) must be > 0, got {self.decay_rate}"
            )
        if not self.safety_thresh > 0:
            raise ValueError(f"policy_loss.safety_thresh must be > 0, got {self.safety_thresh}")
        if not self.future_kl_clip_high_only and self.future_kl_clip_ratio >= 1:
            raise ValueError(
                "policy_loss.future_kl_clip_ratio must be < 1 with future_kl_clip_high_only=false "
                f"(the lower bound 1 - ratio would be <= 0), got {self.future_kl_clip_ratio}"
            )
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(
                f"policy_loss.loss_agg_mode {self.loss_agg_mode!r} is unknown; choose one of {AGG_MODES}"
            )
        if self.loss_norm_length is not None and not self.loss_norm_length > 0:
            raise ValueError(
                f"policy_loss.loss_norm_length must be > 0, got {self.loss_norm_length}"
            )


@dataclass
class PolicyLossTerms:
    """What a registered loss returns: per-token loss, the mask it applies to, metrics."""

    loss_mat: torch.Tensor
    loss_mask: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


PolicyLossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossConfig], PolicyLossTerms
]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: make `fn(old_log_prob, log_prob, advantages, response_mask, config)` a loss."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        existing = POLICY_LOSSES.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(
                f"policy loss {name!r} is already registered ({existing.__qualname__})"
            )
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLossFn:
    if name not in POLICY_LOSSES:
        raise ValueError(
            f"unknown policy loss {name!r}; registered: {sorted(POLICY_LOSSES)} "
            "(set actor.loss_name, or register one with @register_policy_loss)"
        )
    return POLICY_LOSSES[name]


def compute_policy_terms(
    name: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig | None = None,
) -> PolicyLossTerms:
    """Per-token loss + surviving mask + metrics of loss `name` (no aggregation)."""
    fn = get_policy_loss(name)
    shape = log_prob.shape
    for label, t in (
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
    ):
        if t.shape != shape:
            raise ValueError(f"{label} shape {tuple(t.shape)} != log_prob shape {tuple(shape)}")
    return fn(old_log_prob, log_prob, advantages, response_mask, config or PolicyLossConfig())


def compute_policy_loss(
    name: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig | None = None,
    global_denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss and metrics. `global_denominator`: mini-batch-wide normaliser, if split."""
    config = config or PolicyLossConfig()
    terms = compute_policy_terms(name, old_log_prob, log_prob, advantages, response_mask, config)
    loss = aggregate_loss(
        terms.loss_mat,
        terms.loss_mask,
        config.loss_agg_mode,
        global_denominator=global_denominator,
        norm_length=config.loss_norm_length,
    )
    metrics = {"pg_loss": float(loss.detach()), **terms.metrics}
    return loss, metrics


# ----------------------------------------------------------------------------- shared pieces


def _log_ratio_and_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor):
    """§1.1: δ = clamp(log π − log π_old, ±20), r = exp(δ). Gradient flows through log π only."""
    log_ratio = torch.clamp(log_prob - old_log_prob.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio, torch.exp(log_ratio)


@dataclass
class _DualClip:
    pg_losses: torch.Tensor  # ℓ_t
    unclipped: torch.Tensor  # L1
    clipped: torch.Tensor  # L2
    max_clip: torch.Tensor  # Lc = max(L1, L2)
    dual_bound: torch.Tensor  # L3 = −Ã·c


def _dual_clip(adv: torch.Tensor, ratio: torch.Tensor, cfg: PolicyLossConfig) -> _DualClip:
    """§1.8: PPO clip with clip-higher, then the dual clip −Ã·c for negative advantages."""
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    max_clip = torch.maximum(unclipped, clipped)
    dual_bound = -adv * cfg.clip_ratio_c
    pg_losses = torch.where(adv < 0, torch.minimum(dual_bound, max_clip), max_clip)
    return _DualClip(pg_losses, unclipped, clipped, max_clip, dual_bound)


def _clip_metrics(
    dc: _DualClip, advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    return {
        "pg_clipfrac": float(masked_mean((dc.clipped > dc.unclipped).float(), mask)),
        "ppo_kl": float(masked_mean(-log_ratio.detach(), mask)),
        "pg_clipfrac_lower": float(
            masked_mean(((dc.max_clip > dc.dual_bound) & (advantages < 0)).float(), mask)
        ),
    }


def _quantiles(values: torch.Tensor, qs: list[float]) -> list[float]:
    """torch.quantile's 'linear' rule via one sort (torch.quantile caps inputs at 2^24)."""
    if values.numel() == 0:
        return [0.0] * len(qs)
    ordered = torch.sort(values.detach().double().flatten()).values
    out = []
    for q in qs:
        pos = q * (ordered.numel() - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)))
    return out


def _ratio_tail_metrics(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_ratio_c: float
) -> dict[str, float]:
    """Importance-ratio tails by advantage sign, over the response mask (reference names)."""
    ratio = ratio.detach()
    valid = mask.bool()
    neg = advantages < 0
    metrics = {
        "neg_ratio_2_3": float(masked_mean(((ratio >= 2) & (ratio < 3) & neg).float(), mask)),
        "neg_ratio_3_4": float(masked_mean(((ratio >= 3) & (ratio < 4) & neg).float(), mask)),
        "neg_ratio_4_10": float(
            masked_mean(((ratio >= 4) & (ratio < clip_ratio_c) & neg).float(), mask)
        ),
        "pos_mini_frac": float(masked_mean(((ratio < 1e-3) & (advantages > 0)).float(), mask)),
    }
    neg_vals = ratio[neg & valid]
    pos_vals = ratio[(advantages > 0) & valid]
    n75, n995, n999 = _quantiles(neg_vals, [0.75, 0.995, 0.999])
    metrics.update(
        neg_is_max=float(neg_vals.max()) if neg_vals.numel() else 0.0,
        neg_is_p75=n75,
        neg_is_p995=n995,
        neg_is_p999=n999,
    )
    p25, p50, p75, p995, p999 = _quantiles(pos_vals, [0.25, 0.5, 0.75, 0.995, 0.999])
    metrics.update(
        pos_is_min=float(pos_vals.min()) if pos_vals.numel() else 0.0,
        pos_is_p25=p25,
        pos_is_median=p50,
        pos_is_p75=p75,
        pos_is_p995=p995,
        pos_is_p999=p999,
        pos_is_max=float(pos_vals.max()) if pos_vals.numel() else 0.0,
    )
    return metrics


def _masked_min_max(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    vals = values.detach()[mask.bool()]
    return (float(vals.min()), float(vals.max())) if vals.numel() else (0.0, 0.0)


# ----------------------------------------------------------------------------- the losses


@register_policy_loss("vanilla")
def vanilla_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
) -> PolicyLossTerms:
    """PPO with clip-higher (ε_l, ε_h) and dual clip c: DAPO's token-level loss."""
    log_ratio, ratio = _log_ratio_and_ratio(old_log_prob, log_prob)
    advantages = advantages.detach()
    dc = _dual_clip(advantages, ratio, config)
    metrics = _clip_metrics(dc, advantages, log_ratio, response_mask)
    return PolicyLossTerms(dc.pg_losses, response_mask.to(log_prob.dtype), metrics)


def influence_weights(
    log_ratio: torch.Tensor,
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """§1.2–1.6: detached influence weights f, raw exp(FutureKL), and the clip bounds."""
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        participation = log_ratio <= math.log(config.clip_ratio_c)  # §1.2
        gamma = gamma_from_half_life(config.decay_rate)  # §1.3
        fkl = future_kl(log_ratio, response_mask.bool() & participation, gamma)  # §1.4
        raw = torch.exp(fkl)
        eps_f = config.future_kl_clip_ratio  # §1.5
        if eps_f == 0:
            lower, upper = 0.0, 10.0
            weights = torch.clamp(raw, max=upper)
        elif config.future_kl_clip_high_only:
            lower, upper = 1.0, 1.0 + eps_f
            weights = torch.clamp(raw, lower, upper)
        else:
            lower, upper = 1.0 - eps_f, 1.0 + eps_f
            weights = torch.clamp(raw, lower, upper)
        unsafe = (advantages < 0) & (ratio.detach() > config.safety_thresh)  # §1.6
        weights = torch.where(unsafe, torch.clamp(weights, 0.8, 1.0), weights)
    return weights, raw, lower, upper


@register_policy_loss("fipo")
def fipo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
) -> PolicyLossTerms:
    """FIPO: dual-clip PPO on advantages re-weighted by clipped exp(Future-KL)."""
    log_ratio, ratio = _log_ratio_and_ratio(old_log_prob, log_prob)  # §1.1
    advantages = advantages.detach()
    weights, raw, lower, upper = influence_weights(
        log_ratio, ratio, advantages, response_mask, config
    )
    weighted_adv = advantages * weights  # §1.7 (constants: §1.11)
    dc = _dual_clip(weighted_adv, ratio, config)  # §1.8

    # §1.9: a response with more than one dual-clipped token leaves the loss entirely.
    dual_clipped = (advantages < 0) & (dc.max_clip > dc.dual_bound) & response_mask.bool()
    seq_valid = dual_clipped.sum(-1, keepdim=True) <= 1
    loss_mask = (response_mask.bool() & seq_valid).to(log_prob.dtype)

    metrics = _clip_metrics(dc, advantages, log_ratio, response_mask)
    iw_min, iw_max = _masked_min_max(weights, response_mask)
    raw_min, raw_max = _masked_min_max(raw, response_mask)
    upper_frac = float(masked_mean((weights >= upper - 1e-7).float(), response_mask))
    lower_frac = float(masked_mean((weights <= lower + 1e-7).float(), response_mask))
    metrics.update(
        influence_weights_mean=float(masked_mean(weights, response_mask)),
        influence_weights_min=iw_min,
        influence_weights_max=iw_max,
        influence_weights_mean_raw=float(masked_mean(raw, response_mask)),
        raw_influence_weights_min=raw_min,
        raw_influence_weights_max=raw_max,
        IW_upper_clip_ratio=upper_frac,
        IW_lower_clip_ratio=lower_frac,
        IW_overall_clip_ratio=upper_frac + lower_frac,
        invalid_seq_frac=float((~seq_valid).float().mean()) if seq_valid.numel() else 0.0,
    )
    metrics.update(_ratio_tail_metrics(ratio, advantages, response_mask, config.clip_ratio_c))
    return PolicyLossTerms(dc.pg_losses, loss_mask, metrics)
