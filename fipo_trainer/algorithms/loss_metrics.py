"""The policy losses' metrics, computed from 1-D vectors of per-token values.

Why vectors: under sequence parallel a rank holds only part of each response, and a
metric must be the one the full rows give. ``sequence_shards.token_values`` collects each
quantity at every loss token of the full rows (one collective for all of them), and the
functions here turn those vectors into the reference's metric names.

A metric of an empty token subset (no positive-advantage token, no loss token) is left out:
it has no value, and a 0.0 stand-in would drag the min and the token-weighted means over
micro-batches (``metrics.reduce_metrics`` skips a missing key). ``with_empty_subset_zeros``
puts back the 0.0 that verl 0.5 logs, for ``loss_scale: reference`` (verl's plain mean).
"""

from __future__ import annotations

import math

import torch


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else 0.0


NEG_IS_QUANTILES = {"neg_is_p75": 0.75, "neg_is_p995": 0.995, "neg_is_p999": 0.999}
POS_IS_QUANTILES = {
    "pos_is_p25": 0.25,
    "pos_is_median": 0.5,
    "pos_is_p75": 0.75,
    "pos_is_p995": 0.995,
    "pos_is_p999": 0.999,
}
# The metrics of the negative- / positive-advantage token subsets (not the fractions).
NEG_SUBSET_METRICS = ("neg_is_max", *NEG_IS_QUANTILES)
POS_SUBSET_METRICS = ("pos_is_min", "pos_is_max", *POS_IS_QUANTILES)
# The metrics left out for an empty subset, keyed by a metric their family always reports.
EMPTY_SUBSET_METRICS: dict[str, tuple[str, ...]] = {
    "neg_ratio_2_3": NEG_SUBSET_METRICS,
    "pos_mini_frac": POS_SUBSET_METRICS,
    "influence_weights_mean": (
        "influence_weights_min",
        "influence_weights_max",
        "raw_influence_weights_min",
        "raw_influence_weights_max",
    ),
}
_SUBSET_OF = {
    **dict.fromkeys(POS_SUBSET_METRICS, "pos"),
    **dict.fromkeys(NEG_SUBSET_METRICS, "neg"),
}


def _subset(
    values: torch.Tensor, min_key: str | None, max_key: str | None, qs: dict[str, float]
) -> dict[str, float]:
    """Min, max and quantiles of one token subset; {} when it is empty (no value)."""
    if values.numel() == 0:
        return {}
    out = dict(zip(qs, quantiles(values, list(qs.values())))) if qs else {}
    if min_key:
        out[min_key] = float(values.min())
    if max_key:
        out[max_key] = float(values.max())
    return out


def with_empty_subset_zeros(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` plus 0.0 for each empty-subset metric its family left out: the value verl
    0.5 logs there, so that ``loss_scale: reference`` (verl's plain mean) stays verl's."""
    out = dict(metrics)
    for family, keys in EMPTY_SUBSET_METRICS.items():
        if family in metrics:
            out.update({k: 0.0 for k in keys if k not in metrics})
    return out


def token_weighted_parts(
    metrics: dict[str, float], advantages: torch.Tensor, response_mask: torch.Tensor
) -> list[tuple[dict[str, float], float]]:
    """One micro-batch's ``metrics`` as (part, weight) pairs for ``metrics.reduce_metrics``:
    a positive-/negative-advantage subset metric (keys may carry a prefix, ``actor/``) weighs
    by that subset's tokens, every other metric by all response tokens.

    Why: a subset's quantile describes its own tokens only. Weighted by all response tokens,
    a micro-batch with one positive token among many negative ones would outweigh one full
    of positive tokens in ``pos_is_median``. ``loss_scale: reference`` keeps verl's plain
    mean over micro-batches and does not use this.
    """
    mask = response_mask.bool()
    adv = advantages.to(mask.device)
    pos, neg = float((mask & (adv > 0)).sum()), float((mask & (adv < 0)).sum())
    parts: dict[str, tuple[dict[str, float], float]] = {
        "all": ({}, float(mask.sum())),
        "pos": ({}, pos),
        "neg": ({}, neg),
    }
    for key, value in metrics.items():
        parts[_SUBSET_OF.get(key.rsplit("/", 1)[-1], "all")][0][key] = value
    return [(part, weight) for part, weight in parts.values() if part]


def quantiles(values: torch.Tensor, qs: list[float]) -> list[float]:
    """torch.quantile's 'linear' rule via one sort (torch.quantile caps inputs at 2^24)."""
    if values.numel() == 0:
        raise ValueError("no quantiles of an empty vector (leave the metric out)")
    ordered = torch.sort(values.detach().double().flatten()).values
    out = []
    for q in qs:
        pos = q * (ordered.numel() - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)))
    return out


def clip_metrics(v: dict[str, torch.Tensor]) -> dict[str, float]:
    """pg_clipfrac, ppo_kl, pg_clipfrac_lower from the token vectors ``clipped`` (PPO clip
    active), ``log_ratio`` and ``dual_clipped`` (the dual bound active, Ã < 0)."""
    return {
        "pg_clipfrac": _mean(v["clipped"]),
        "ppo_kl": _mean(-v["log_ratio"]),
        "pg_clipfrac_lower": _mean(v["dual_clipped"]),
    }


def ratio_tail_metrics(v: dict[str, torch.Tensor], clip_ratio_c: float) -> dict[str, float]:
    """Importance-ratio tails by advantage sign (reference names), from ``ratio`` and
    ``advantages`` token vectors."""
    ratio, adv = v["ratio"], v["advantages"]
    neg, pos = adv < 0, adv > 0
    metrics = {
        "neg_ratio_2_3": _mean(((ratio >= 2) & (ratio < 3) & neg).float()),
        "neg_ratio_3_4": _mean(((ratio >= 3) & (ratio < 4) & neg).float()),
        "neg_ratio_4_10": _mean(((ratio >= 4) & (ratio < clip_ratio_c) & neg).float()),
        "pos_mini_frac": _mean(((ratio < 1e-3) & pos).float()),
    }
    metrics.update(_subset(ratio[neg], None, "neg_is_max", NEG_IS_QUANTILES))
    metrics.update(_subset(ratio[pos], "pos_is_min", "pos_is_max", POS_IS_QUANTILES))
    return metrics


def influence_metrics(v: dict[str, torch.Tensor], lower: float, upper: float) -> dict[str, float]:
    """FIPO's influence-weight metrics from ``weights`` and ``raw`` token vectors."""
    weights, raw = v["weights"], v["raw"]
    upper_frac = _mean((weights >= upper - 1e-7).float())
    lower_frac = _mean((weights <= lower + 1e-7).float())
    return {
        "influence_weights_mean": _mean(weights),
        **_subset(weights, "influence_weights_min", "influence_weights_max", {}),
        "influence_weights_mean_raw": _mean(raw),
        **_subset(raw, "raw_influence_weights_min", "raw_influence_weights_max", {}),
        "IW_upper_clip_ratio": upper_frac,
        "IW_lower_clip_ratio": lower_frac,
        "IW_overall_clip_ratio": upper_frac + lower_frac,
    }
