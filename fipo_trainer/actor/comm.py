"""The few collectives the update needs, over the actor's data-parallel process group.

Why a class: the update (``policy_trainer``) is Ray-free and must run in one process too;
with ``world_size == 1`` every call is local and torch.distributed need not exist.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Collectives:
    """Sums, maxima, object gathers and barriers across ``world_size`` ranks."""

    def __init__(self, world_size: int, device: torch.device | str = "cpu") -> None:
        self.world_size = int(world_size)
        self.device = torch.device(device)

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
