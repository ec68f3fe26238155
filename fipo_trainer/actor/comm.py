"""The few collectives the update needs, over the actor's process group.

Why a class: the update (``policy_trainer``) is Ray-free and must run in one process too;
with ``world_size == 1`` every call is local and torch.distributed need not exist.

Sequence parallel: the world is ``world_size / sp_size`` data-parallel groups of
``sp_size`` consecutive ranks; the ranks of a group hold the same rows, so a quantity of
the rows (a token count, a normaliser) is counted once per group (``once_per_group``),
while a quantity of a rank's own tokens (a loss numerator) is summed over every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Collectives:
    """Sums, maxima, object gathers and barriers across ``world_size`` ranks, and the
    all-gather of this rank's sequence-parallel group."""

    def __init__(
        self, world_size: int, device: torch.device | str = "cpu", sp_size: int = 1
    ) -> None:
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.sp_size = int(sp_size)
        if self.sp_size < 1 or self.world_size % self.sp_size:
            raise ValueError(
                f"actor.ulysses_sequence_parallel_size={sp_size} does not divide the "
                f"{world_size} actor ranks"
            )
        rank = dist.get_rank() if self.world_size > 1 else 0
        self.sp_rank = rank % self.sp_size
        self.sp_group = None
        if self.sp_size > 1:
            # Every rank must create every group, in the same order.
            for first in range(0, self.world_size, self.sp_size):
                group = dist.new_group(list(range(first, first + self.sp_size)))
                if first <= rank < first + self.sp_size:
                    self.sp_group = group

    @property
    def dp_size(self) -> int:
        """Data-parallel groups (distinct row shards)."""
        return self.world_size // self.sp_size

    def _reduce(self, values: list[float], op, dtype: torch.dtype) -> list:
        t = torch.tensor(values, dtype=dtype, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM, torch.float64)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX, torch.float64)

    def max_int(self, value: int) -> int:
        return int(self._reduce([value], dist.ReduceOp.MAX, torch.int64)[0])

    def once_per_group(self, values: list[float]) -> list[float]:
        """``values`` on the first rank of each sequence-parallel group, 0 elsewhere: pass
        the result to ``sum`` to count a quantity of the rows once."""
        return list(values) if self.sp_rank == 0 else [0.0] * len(values)

    def sp_all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[sp_size, *shape]: ``tensor`` (same shape on every rank) of each rank of the
        sequence-parallel group, in rank order."""
        if self.sp_size == 1:
            return tensor[None]
        parts = [torch.empty_like(tensor) for _ in range(self.sp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.sp_group)
        return torch.stack(parts)

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
