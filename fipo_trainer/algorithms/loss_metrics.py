"""The policy losses' metrics, computed from 1-D vectors of per-token values.

Why vectors: under sequence parallel a rank holds only part of each response, and a
metric must be the one the full rows give. ``sequence_shards.token_values`` collects each
quantity at every loss token of the full rows (one collective for all of them), and the
functions here turn those vectors into the reference's metric names.
"""

from __future__ import annotations

import math

import torch


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else 0.0


def _min_max(values: torch.Tensor) -> tuple[float, float]:
    return (float(values.min()), float(values.max())) if values.numel() else (0.0, 0.0)


def quantiles(values: torch.Tensor, qs: list[float]) -> list[float]:
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
    neg_vals, pos_vals = ratio[neg], ratio[pos]
    n75, n995, n999 = quantiles(neg_vals, [0.75, 0.995, 0.999])
    metrics.update(
        neg_is_max=_min_max(neg_vals)[1], neg_is_p75=n75, neg_is_p995=n995, neg_is_p999=n999
    )
    p25, p50, p75, p995, p999 = quantiles(pos_vals, [0.25, 0.5, 0.75, 0.995, 0.999])
    metrics.update(
        pos_is_min=_min_max(pos_vals)[0],
        pos_is_p25=p25,
        pos_is_median=p50,
        pos_is_p75=p75,
        pos_is_p995=p995,
        pos_is_p999=p999,
        pos_is_max=_min_max(pos_vals)[1],
    )
    return metrics


def influence_metrics(v: dict[str, torch.Tensor], lower: float, upper: float) -> dict[str, float]:
    """FIPO's influence-weight metrics from ``weights`` and ``raw`` token vectors."""
    weights, raw = v["weights"], v["raw"]
    iw_min, iw_max = _min_max(weights)
    raw_min, raw_max = _min_max(raw)
    upper_frac = _mean((weights >= upper - 1e-7).float())
    lower_frac = _mean((weights <= lower + 1e-7).float())
    return {
        "influence_weights_mean": _mean(weights),
        "influence_weights_min": iw_min,
        "influence_weights_max": iw_max,
        "influence_weights_mean_raw": _mean(raw),
        "raw_influence_weights_min": raw_min,
        "raw_influence_weights_max": raw_max,
        "IW_upper_clip_ratio": upper_frac,
        "IW_lower_clip_ratio": lower_frac,
        "IW_overall_clip_ratio": upper_frac + lower_frac,
    }
