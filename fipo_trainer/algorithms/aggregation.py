"""Loss aggregation over a [B, L] loss matrix.

Each mode is "numerator / denominator". Passing `global_denominator` (the same quantity
summed over every micro-batch and rank of a mini-batch, see `local_denominator`) makes the
sum of micro-batch losses equal the full-batch loss exactly, whatever the micro-batch cut.

Under sequence parallel a rank holds only part of each row; `row_counts` (each row's loss
tokens summed over every shard) makes the per-sequence quantities count each token once.
"""

from __future__ import annotations

import torch

from fipo_trainer.algorithms.options import AGG_MODES


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {', '.join(AGG_MODES)}")


def local_denominator(
    mask: torch.Tensor,
    mode: str,
    norm_length: float | None = None,
    row_counts: torch.Tensor | None = None,
) -> float:
    """This micro-batch's share of the normaliser (sum it over micro-batches and ranks).

    ``row_counts``: loss tokens per row over all sequence shards (default: ``mask``'s)."""
    _check_mode(mode)
    counts = mask.to(torch.float64).sum(-1) if row_counts is None else row_counts.double()
    if mode == "token-mean":
        return float(counts.sum())
    n_seqs = float((counts > 0).sum())  # sequences with at least one loss token
    if mode == "seq-mean-token-sum-norm":
        return n_seqs * float(norm_length if norm_length is not None else mask.shape[-1])
    return n_seqs


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_denominator: float | None = None,
    norm_length: float | None = None,
    row_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate a per-token loss.

    token-mean: sum over tokens / #tokens. seq-mean-token-sum: per-sequence sum, mean over
    sequences. seq-mean-token-mean: per-sequence mean, mean over sequences.
    seq-mean-token-sum-norm (Dr. GRPO): per-sequence sum / a constant length (`norm_length`,
    default L), mean over sequences. Sequences with no loss token do not count.
    ``row_counts``: see `local_denominator` (sequence-parallel shards of the rows).
    """
    _check_mode(mode)
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss shape {tuple(loss_mat.shape)} != mask shape {tuple(mask.shape)}")
    maskf = mask.to(loss_mat.dtype)
    token_sum = (loss_mat * maskf).sum(-1)
    if mode == "seq-mean-token-mean":
        counts = maskf.sum(-1) if row_counts is None else row_counts.to(maskf)
        numerator = (token_sum / counts.clamp(min=1)).sum()
    else:
        numerator = token_sum.sum()
    denom = (
        global_denominator
        if global_denominator is not None
        else local_denominator(mask, mode, norm_length, row_counts)
    )
    # An empty mask gives numerator == 0: a zero loss that still carries a (zero) gradient.
    return numerator / denom if denom > 0 else numerator


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where mask is set (0 when the mask is empty)."""
    maskf = mask.to(values.dtype)
    return (values * maskf).sum() / maskf.sum().clamp(min=1)
