"""Sequence-parallel shards of a batch of responses, and the exact reductions across them.

Why this exists: under Ulysses sequence parallel a rank computes log-probs for one
contiguous piece of a packed micro-batch, so it holds a contiguous *segment* of each
response row. A per-token loss needs nothing more, but FIPO needs two quantities that span
a whole response — Future-KL (a discounted suffix sum) and the number of dual-clipped
tokens — and metrics are over every token. Every rank knows every rank's segments (they
follow from the packing), so Future-KL costs one all-gather of B scalars: each rank's
local suffix sum at its first token, stitched with ``future_kl.shard_carries``.

Pure tensors: the one collective (``all_gather``) is injected by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fipo_trainer.algorithms.future_kl import (
    combine_sharded_future_kl,
    future_kl,
    shard_carries,
)

AllGather = Callable[[torch.Tensor], torch.Tensor]  # x on every rank -> [size, *x.shape]


def row_segments(
    response_lengths: Sequence[int], token_slices: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends) [size, B]: the response columns each rank holds of each row.

    Responses are packed back to back (row i's tokens are ``offset_i + column``); rank r
    holds packed response tokens ``[lo_r, hi_r)``. An empty segment has start == end.
    """
    lengths = torch.as_tensor(list(response_lengths), dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    lo = torch.as_tensor([s[0] for s in token_slices], dtype=torch.long)[:, None]
    hi = torch.as_tensor([s[1] for s in token_slices], dtype=torch.long)[:, None]
    starts = torch.minimum((lo - offsets).clamp(min=0), lengths)
    ends = torch.minimum((hi - offsets).clamp(min=0), lengths)
    return torch.minimum(starts, ends), ends


@dataclass(frozen=True)
class SequenceShards:
    """This rank's place among the sequence shards of a [B, L] batch of responses."""

    rank: int
    starts: torch.Tensor  # [size, B] first column of each rank's segment of each row
    ends: torch.Tensor  # [size, B] the column after it
    all_gather: AllGather

    @property
    def size(self) -> int:
        return int(self.starts.shape[0])

    def owned(self, width: int) -> torch.Tensor:
        """[B, width] bool: the columns this rank holds."""
        cols = torch.arange(width, device=self.starts.device)[None, :]
        return (cols >= self.starts[self.rank][:, None]) & (cols < self.ends[self.rank][:, None])

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks of the group (e.g. per-row token counts)."""
        return self.all_gather(values).sum(0)

    def concat_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """[m, n_r] per-rank token values -> [m, sum n_r] on every rank, in rank order."""
        n = torch.tensor([values.shape[1]], dtype=torch.long, device=values.device)
        sizes = self.all_gather(n)[:, 0].tolist()
        padded = torch.nn.functional.pad(values, (0, max(sizes) - values.shape[1]))
        gathered = self.all_gather(padded)  # [size, m, max n]
        return torch.cat([gathered[r, :, : sizes[r]] for r in range(self.size)], dim=1)


def token_values(
    tensors: dict[str, torch.Tensor], mask: torch.Tensor, shards: SequenceShards | None
) -> dict[str, torch.Tensor]:
    """Each [B, L] tensor's values at ``mask`` (this rank's part), over every shard: 1-D
    vectors (float64) in which each token of the full rows appears once. One collective."""
    keep = mask.bool()
    if not tensors:
        return {}
    stacked = torch.stack([t.detach().double()[keep] for t in tensors.values()])
    if shards is not None:
        stacked = shards.concat_tokens(stacked)
    return dict(zip(tensors, stacked, strict=True))


def sharded_future_kl(
    log_ratio: torch.Tensor, mask: torch.Tensor, gamma: float, shards: SequenceShards | None
) -> torch.Tensor:
    """Future-KL of this rank's tokens, exact over the whole response (0 where not held).

    Without shards it is ``future_kl``. With shards: the local suffix sum, plus
    gamma^(distance to the segment's end) x the true F at the first column after it.
    """
    if shards is None:
        return future_kl(log_ratio, mask, gamma)
    width = log_ratio.shape[-1]
    owned = shards.owned(width)
    local = future_kl(log_ratio, mask.bool() & owned, gamma)
    start, end = shards.starts[shards.rank], shards.ends[shards.rank]
    head = local.gather(1, start.clamp(max=max(width - 1, 0))[:, None])[:, 0]
    head = torch.where(end > start, head, torch.zeros_like(head))
    heads = shards.all_gather(head).T  # [B, size]
    carries = shard_carries(heads, (shards.ends - shards.starts).T, gamma)
    full = combine_sharded_future_kl(local, carries[:, shards.rank], gamma, shard_end=end)
    return torch.where(owned, full, torch.zeros_like(full))
