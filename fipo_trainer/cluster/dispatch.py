"""Pure functions that split rows across data-parallel ranks and put results back.

Why balance by length: every rank waits for the slowest one at each collective, so a rank
that got the long responses sets the pace. Balancing is done per mini-batch, because each
mini-batch ends in an optimizer step that synchronises all ranks.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


def balanced_partition(
    weights: Sequence[float], k: int, *, equal_size: bool = False
) -> list[list[int]]:
    """Split item indices into ``k`` parts with near-equal weight sums (greedy LPT).

    Items go heaviest first to the currently lightest part; with ``equal_size`` every part
    gets exactly ``len(weights) / k`` items. Deterministic (ties by index); each part's
    indices are returned sorted so callers keep the original row order.
    """
    n = len(weights)
    if k < 1:
        raise ValueError(f"number of parts must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"cannot split {n} items into {k} non-empty parts")
    if equal_size and n % k:
        raise ValueError(f"cannot split {n} items into {k} equal parts")
    cap = n // k if equal_size else n
    order = sorted(range(n), key=lambda i: (-float(weights[i]), i))
    heap = [(0.0, j) for j in range(k)]  # (load, part)
    parts: list[list[int]] = [[] for _ in range(k)]
    full: list[tuple[float, int]] = []
    for i in order:
        load, j = heapq.heappop(heap)
        parts[j].append(i)
        entry = (load + float(weights[i]), j)
        if len(parts[j]) < cap:
            heapq.heappush(heap, entry)
        else:
            full.append(entry)
    return [sorted(p) for p in parts]


def dp_partition(
    lengths: Sequence[int], world_size: int, mini_batch_rows: int | None = None
) -> list[list[int]]:
    """Row indices per rank: each mini-batch's rows split evenly and balanced by length.

    Rank ``r``'s list is the concatenation, mini-batch after mini-batch, of its share, so
    rank-local mini-batch ``j`` is rows ``[j*m, (j+1)*m)`` of its list (``m`` =
    ``mini_batch_rows / world_size``).
    """
    n = len(lengths)
    mini_batch_rows = mini_batch_rows or n
    if n % mini_batch_rows:
        raise ValueError(f"{n} rows are not a whole number of mini-batches of {mini_batch_rows}")
    if mini_batch_rows % world_size:
        raise ValueError(
            f"a mini-batch of {mini_batch_rows} rows cannot be split evenly across "
            f"{world_size} data-parallel ranks"
        )
    out: list[list[int]] = [[] for _ in range(world_size)]
    for start in range(0, n, mini_batch_rows):
        chunk = [int(x) for x in lengths[start : start + mini_batch_rows]]
        for r, part in enumerate(balanced_partition(chunk, world_size, equal_size=True)):
            out[r].extend(start + i for i in part)
    return out


def restore_order(partitions: Sequence[Sequence[int]]) -> np.ndarray:
    """Index array that maps rank-concatenated rows back to the original order."""
    flat = np.fromiter((i for p in partitions for i in p), dtype=np.int64)
    if not np.array_equal(np.sort(flat), np.arange(len(flat))):
        raise ValueError("partitions must cover rows 0..n-1 exactly once")
    inv = np.empty_like(flat)
    inv[flat] = np.arange(len(flat))
    return inv
