"""Policy losses: PPO/DAPO dual-clip ("vanilla") and FIPO ("fipo"), in an open registry.

A registered loss is a pure function of tensors that returns the *per-token* loss, the mask
it applies to and its metrics; `compute_policy_loss` aggregates it. Keeping aggregation out
of the losses lets a micro-batched update reproduce the full-batch loss exactly (pass the
mini-batch-wide `global_denominator`, see `aggregation.local_denominator`).

The FIPO loss follows FIPO_SPEC.md §1 point by point; comments cite the point numbers.

Sequence parallel: a loss may take ``shards`` (``sequence_shards.SequenceShards``); it then
sees only this rank's segment of each row (``response_mask`` is already restricted to it)
and must make whatever spans a response exact across the shards. The built-in losses do;
a registered loss without the parameter is refused under sequence parallel.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fipo_trainer.algorithms.aggregation import aggregate_loss
from fipo_trainer.algorithms.future_kl import gamma_from_half_life
from fipo_trainer.algorithms.loss_metrics import (
    clip_metrics,
    influence_metrics,
    ratio_tail_metrics,
)
from fipo_trainer.algorithms.options import (  # the torch-free half (config checks)
    POLICY_LOSSES,
    PolicyLossConfig,
    check_policy_loss_name,
    register_policy_loss,
)
from fipo_trainer.algorithms.sequence_shards import (
    SequenceShards,
    sharded_future_kl,
    token_values,
)

LOG_RATIO_CLAMP = 20.0  # §1.1: δ is clamped to ±20 before exp


@dataclass
class PolicyLossTerms:
    """What a registered loss returns: per-token loss, the mask it applies to, metrics, and
    detached per-token diagnostics ([B, L], e.g. FIPO's ``influence_weights``)."""

    loss_mat: torch.Tensor
    loss_mask: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    token_stats: dict[str, torch.Tensor] = field(default_factory=dict)


PolicyLossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossConfig], PolicyLossTerms
]
def takes_shards(fn: PolicyLossFn) -> bool:
    """Whether a registered loss handles sequence-parallel shards (a ``shards`` parameter)."""
    return "shards" in inspect.signature(fn).parameters


def get_policy_loss(name: str) -> PolicyLossFn:
    if name not in POLICY_LOSSES:
        check_policy_loss_name(name)  # raises, naming the losses there are
    return POLICY_LOSSES[name]


def compute_policy_terms(
    name: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig | None = None,
    shards: SequenceShards | None = None,
    is_weights: torch.Tensor | None = None,
) -> PolicyLossTerms:
    """Per-token loss + surviving mask + metrics of loss `name` (no aggregation).

    ``shards``: this rank's sequence-parallel segment of each row (see the module doc).
    ``is_weights``: rollout-correction weights [B, L] (``algorithms.rollout_correction``,
    constants) that multiply the per-token loss, whatever the loss; None = all 1."""
    fn = get_policy_loss(name)
    shape = log_prob.shape
    for label, t in (
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
        ("is_weights", log_prob if is_weights is None else is_weights),
    ):
        if t.shape != shape:
            raise ValueError(f"{label} shape {tuple(t.shape)} != log_prob shape {tuple(shape)}")
    config = config or PolicyLossConfig()
    if shards is None:
        terms = fn(old_log_prob, log_prob, advantages, response_mask, config)
    elif not takes_shards(fn):
        raise ValueError(
            f"policy loss {name!r} takes no `shards` parameter, so it cannot run with "
            "actor.ulysses_sequence_parallel_size > 1 (add `shards=None` to it and make what "
            "spans a response exact across shards, or set the size to 1)"
        )
    else:
        terms = fn(old_log_prob, log_prob, advantages, response_mask, config, shards=shards)
    if is_weights is not None:
        terms.loss_mat = terms.loss_mat * is_weights.detach().to(terms.loss_mat)
    return terms


def compute_policy_loss(
    name: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig | None = None,
    global_denominator: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss and metrics. `global_denominator`: mini-batch-wide normaliser, if split;
    `is_weights`: rollout-correction weights of the per-token loss (see compute_policy_terms)."""
    config = config or PolicyLossConfig()
    terms = compute_policy_terms(
        name, old_log_prob, log_prob, advantages, response_mask, config, is_weights=is_weights
    )
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


def _clip_tokens(dc: _DualClip, advantages: torch.Tensor, log_ratio: torch.Tensor) -> dict:
    """The per-token flags behind ``loss_metrics.clip_metrics``."""
    return {
        "clipped": dc.clipped > dc.unclipped,
        "log_ratio": log_ratio,
        "dual_clipped": (dc.max_clip > dc.dual_bound) & (advantages < 0),
    }


# ----------------------------------------------------------------------------- the losses


@register_policy_loss("vanilla")
def vanilla_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    shards: SequenceShards | None = None,
) -> PolicyLossTerms:
    """PPO with clip-higher (ε_l, ε_h) and dual clip c: DAPO's token-level loss."""
    log_ratio, ratio = _log_ratio_and_ratio(old_log_prob, log_prob)
    advantages = advantages.detach()
    dc = _dual_clip(advantages, ratio, config)
    flags = _clip_tokens(dc, advantages, log_ratio)
    tokens = token_values(flags, response_mask, shards)
    stats = {"ratio": ratio.detach(), **{k: flags[k] for k in ("clipped", "dual_clipped")}}
    mask = response_mask.to(log_prob.dtype)
    return PolicyLossTerms(dc.pg_losses, mask, clip_metrics(tokens), stats)


def influence_weights(
    log_ratio: torch.Tensor,
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    shards: SequenceShards | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, float, torch.Tensor]:
    """§1.2–1.6: detached influence weights f, raw exp(FutureKL), the clip bounds, FutureKL.

    With ``shards`` the Future-KL of this rank's tokens is exact over the whole response."""
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        mask = response_mask.bool()
        if config.participation_filter:  # §1.2 (false: the ablation without the filter)
            mask = mask & (log_ratio <= math.log(config.clip_ratio_c))
        gamma = gamma_from_half_life(config.decay_rate)  # §1.3
        fkl = sharded_future_kl(log_ratio, mask, gamma, shards)  # §1.4
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
    return weights, raw, lower, upper, fkl


@register_policy_loss("fipo")
def fipo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    shards: SequenceShards | None = None,
) -> PolicyLossTerms:
    """FIPO: dual-clip PPO on advantages re-weighted by clipped exp(Future-KL)."""
    log_ratio, ratio = _log_ratio_and_ratio(old_log_prob, log_prob)  # §1.1
    advantages = advantages.detach()
    weights, raw, lower, upper, fkl = influence_weights(
        log_ratio, ratio, advantages, response_mask, config, shards
    )
    weighted_adv = advantages * weights  # §1.7 (constants: §1.11)
    dc = _dual_clip(weighted_adv, ratio, config)  # §1.8

    # §1.9: a response with more than one dual-clipped token (on any shard) leaves the loss.
    dual_clipped = (advantages < 0) & (dc.max_clip > dc.dual_bound) & response_mask.bool()
    count = dual_clipped.sum(-1, keepdim=True)
    if shards is not None:
        count = shards.sum(count)
    seq_valid = count <= 1
    loss_mask = (response_mask.bool() & seq_valid).to(log_prob.dtype)

    per_token = _clip_tokens(dc, advantages, log_ratio)
    per_token.update(weights=weights, raw=raw, ratio=ratio, advantages=advantages)
    tokens = token_values(per_token, response_mask, shards)
    metrics = clip_metrics(tokens)
    metrics.update(influence_metrics(tokens, lower, upper))
    metrics["invalid_seq_frac"] = float((~seq_valid).float().mean()) if seq_valid.numel() else 0.0
    metrics.update(ratio_tail_metrics(tokens, config.clip_ratio_c))
    stats = {  # detached, per token: what rollout-dump steps record (trainer.token_record_samples)
        "influence_weights": weights,
        "raw_influence_weights": raw,
        "future_kl": fkl,
        "ratio": ratio.detach(),
        "clipped": per_token["clipped"],
        "dual_clipped": per_token["dual_clipped"],
        "dropped": (~seq_valid).expand_as(weights),
    }
    return PolicyLossTerms(dc.pg_losses, loss_mask, metrics, stats)
