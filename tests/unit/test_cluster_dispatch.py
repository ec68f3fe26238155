"""Pure partition helpers used to deal rows to data-parallel ranks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fipo_trainer.cluster.dispatch import balanced_partition, dp_partition, restore_order


def test_balanced_partition_equal_size_balances_sums():
    rng = random.Random(0)
    weights = [rng.randint(1, 1000) for _ in range(64)]
    parts = balanced_partition(weights, 4, equal_size=True)
    assert sorted(i for p in parts for i in p) == list(range(64))
    assert all(len(p) == 16 for p in parts)
    sums = [sum(weights[i] for i in p) for p in parts]
    naive = [sum(weights[i * 16 : (i + 1) * 16]) for i in range(4)]
    assert max(sums) - min(sums) <= max(weights)
    assert max(sums) - min(sums) < max(naive) - min(naive)
    assert all(p == sorted(p) for p in parts)


def test_balanced_partition_unequal_sizes_and_errors():
    parts = balanced_partition([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2)
    assert sorted(sum([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1][i] for i in p) for p in parts) == [10, 10]
    with pytest.raises(ValueError, match="non-empty"):
        balanced_partition([1, 2], 3)
    with pytest.raises(ValueError, match="equal parts"):
        balanced_partition([1, 2, 3], 2, equal_size=True)


def test_dp_partition_is_per_mini_batch():
    lengths = [100, 1, 1, 1, 50, 50, 2, 2]
    parts = dp_partition(lengths, 2, mini_batch_rows=4)
    # Rank-local mini-batch j (2 rows each) comes from global mini-batch j.
    for rank_rows in parts:
        assert all(i < 4 for i in rank_rows[:2]) and all(i >= 4 for i in rank_rows[2:])
    # The 100-token row's rank gets a 1-token row; the 50-token rows go to different ranks.
    first = next(p for p in parts if 0 in p[:2])
    assert sorted(lengths[i] for i in first[:2]) == [1, 100]
    assert sorted(lengths[i] for p in parts for i in p[2:] if lengths[i] == 50) == [50, 50]
    assert all(sum(lengths[i] == 50 for i in p[2:]) == 1 for p in parts)
    with pytest.raises(ValueError, match="mini-batches of 3"):
        dp_partition(lengths, 2, mini_batch_rows=3)
    with pytest.raises(ValueError, match="evenly across 3"):
        dp_partition(lengths, 3, mini_batch_rows=4)


def test_restore_order_roundtrip():
    parts = [[5, 0, 3], [1, 4, 2]]
    inv = restore_order(parts)
    flat = np.array([i for p in parts for i in p])
    assert flat[inv].tolist() == list(range(6))
    with pytest.raises(ValueError, match="exactly once"):
        restore_order([[0, 1], [1, 2]])
