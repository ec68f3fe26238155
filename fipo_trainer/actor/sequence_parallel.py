"""Cutting a packed micro-batch into Ulysses sequence-parallel pieces, one per rank.

Why contiguous equal pieces: the Ulysses all-to-all (``actor.ulysses``) trades the sequence
axis for the head axis, so every rank of a group must hold the same number of tokens; the
packed sequence is padded at its end with a separate dummy sequence (position ids restart
at 0), which no real token attends to. Each rank computes logits only where its own
positions predict a response token, so the K response tokens of the micro-batch split into
one contiguous slice per rank (``token_slices``); the slices, known to every rank, say
where each rank's tokens sit in the rows (``algorithms.sequence_shards.row_segments``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fipo_trainer.actor.micro_batch import PackedRows


@dataclass
class PackedShard:
    """One rank's piece of a packed micro-batch."""

    local: PackedRows  # this rank's tokens; logits at its own response-predicting positions
    token_slices: list[tuple[int, int]]  # response tokens [lo, hi) each rank predicts
    rank: int
    num_targets: int  # K, the micro-batch's response tokens

    def place(self, values: torch.Tensor) -> torch.Tensor:
        """[K_local] values of this rank -> [K], zeros elsewhere (keeps the autograd graph)."""
        lo, hi = self.token_slices[self.rank]
        before = values.new_zeros(lo)
        after = values.new_zeros(self.num_targets - hi)
        return torch.cat([before, values, after])


def shard_packed(packed: PackedRows, size: int, rank: int) -> PackedShard:
    """Rank ``rank``'s contiguous piece of ``packed`` (padded to a multiple of ``size``)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a sequence-parallel group of {size}")
    total = packed.num_tokens
    piece = max(1, math.ceil(total / size))
    pad = piece * size - total
    ids, pos = packed.input_ids, packed.position_ids
    if pad:
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype, device=pos.device)[None]], dim=1)
    bounds = torch.arange(size + 1, device=packed.logit_positions.device) * piece
    cuts = torch.searchsorted(packed.logit_positions, bounds).tolist()
    slices = [(cuts[r], cuts[r + 1]) for r in range(size)]
    lo, hi = slices[rank]
    start = rank * piece
    local = PackedRows(
        input_ids=ids[:, start : start + piece],
        position_ids=pos[:, start : start + piece],
        logit_positions=packed.logit_positions[lo:hi] - start,
        targets=packed.targets[lo:hi],
        response_lengths=[],  # rows are unpacked from the whole micro-batch, not the piece
        sequence_position_ids=pos,
    )
    return PackedShard(local, slices, rank, int(packed.targets.shape[0]))
