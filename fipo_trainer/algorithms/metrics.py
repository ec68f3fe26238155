"""Combining per-micro-batch metrics into one value per mini-batch / step."""

from __future__ import annotations

from collections.abc import Sequence


def metric_reduction(name: str) -> str:
    """How a metric combines across micro-batches and ranks: max, min or weighted mean."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf.endswith("_max"):
        return "max"
    if leaf.endswith("_min"):
        return "min"
    return "mean"


def reduce_metrics(
    metrics: Sequence[dict[str, float]], weights: Sequence[float] | None = None
) -> dict[str, float]:
    """Max/min where the name says so, else a weighted mean (weights: e.g. token counts).

    Quantile metrics (p75, p995, ...) become the weighted mean of the parts' quantiles, an
    approximation also made by the reference implementation across micro-batches.
    """
    if weights is None:
        weights = [1.0] * len(metrics)
    if len(weights) != len(metrics):
        raise ValueError(f"{len(metrics)} metric dicts but {len(weights)} weights")
    out: dict[str, float] = {}
    keys = {k for m in metrics for k in m}
    for key in sorted(keys):
        pairs = [(m[key], w) for m, w in zip(metrics, weights) if key in m]
        how = metric_reduction(key)
        if how == "max":
            out[key] = max(v for v, _ in pairs)
        elif how == "min":
            out[key] = min(v for v, _ in pairs)
        else:
            total = sum(w for _, w in pairs)
            out[key] = (
                sum(v * w for v, w in pairs) / total
                if total > 0
                else sum(v for v, _ in pairs) / len(pairs)
            )
    return out


def mean_metrics(metrics: Sequence[dict[str, float]]) -> dict[str, float]:
    """The plain mean of every key over the dicts that have it (verl 0.5's reduction:
    each micro-batch's value weighs the same, ``_max``/``_min`` metrics included)."""
    keys = {k for m in metrics for k in m}
    out: dict[str, float] = {}
    for key in sorted(keys):
        values = [m[key] for m in metrics if key in m]
        out[key] = sum(values) / len(values)
    return out
