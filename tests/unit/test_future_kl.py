"""Future-KL: exact against the quadratic definition, O(L) scan, shard stitching."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fipo_trainer.algorithms.future_kl import (
    combine_sharded_future_kl,
    discounted_reverse_cumsum,
    future_kl,
    future_kl_reference,
    gamma_from_half_life,
    shard_carries,
)


def quadratic_future_kl(log_ratio: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """The definition, term by term, in float64 with exact integer powers."""
    d = (log_ratio * mask.to(log_ratio.dtype)).double()
    length = d.shape[1]
    k = torch.arange(length)
    dist = k[None, :] - k[:, None]  # [t, k] = k - t
    powers = torch.tensor(gamma, dtype=torch.float64) ** dist.clamp(min=0).double()
    weights = torch.where(dist >= 0, powers, torch.zeros((), dtype=torch.float64))
    return d @ weights.T


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().clamp(min=1.0)
    err = (actual.double() - expected.double()).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} x {scale:.3e}"


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 300),
    half_life=st.floats(0.5, 4096.0),
    keep=st.floats(0.0, 1.0),
    block=st.sampled_from([2, 3, 16, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_matches_quadratic_definition_float64(batch, length, half_life, keep, block, seed):
    gen = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < keep
    gamma = gamma_from_half_life(half_life)
    expected = quadratic_future_kl(log_ratio, mask, gamma)
    assert_rel_close(future_kl(log_ratio, mask, gamma, block_size=block), expected, 1e-10)
    assert_rel_close(future_kl_reference(log_ratio, mask, gamma, chunk_size=37), expected, 1e-10)


def test_float_mask_and_bool_mask_agree():
    log_ratio = torch.randn(3, 50, dtype=torch.float64)
    mask = torch.rand(3, 50) > 0.5
    gamma = gamma_from_half_life(32)
    assert torch.equal(
        future_kl(log_ratio, mask, gamma), future_kl(log_ratio, mask.double(), gamma)
    )


def test_recurrence_holds_and_masked_tail_is_zero():
    gamma = gamma_from_half_life(8)
    log_ratio = torch.randn(2, 200, dtype=torch.float64)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[:, 150:] = False  # padding after the response
    f = future_kl(log_ratio, mask, gamma)
    d = log_ratio * mask
    torch.testing.assert_close(f[:, :-1], d[:, :-1] + gamma * f[:, 1:], rtol=0, atol=1e-12)
    assert torch.all(f[:, 150:] == 0)


def test_long_sequence_no_overflow_float32():
    """L = 20480 with a short half-life: gamma^-t would overflow; our scan must not."""
    gamma = gamma_from_half_life(0.5)
    log_ratio = torch.randn(2, 20480)
    f = future_kl(log_ratio, torch.ones_like(log_ratio, dtype=torch.bool), gamma)
    assert torch.isfinite(f).all()
    # With gamma = 0.25 the sum is dominated by the next few tokens.
    expected = quadratic_future_kl(log_ratio[:, -300:], torch.ones(2, 300, dtype=torch.bool), gamma)
    assert_rel_close(f[:, -300:], expected, 1e-5)


def test_empty_length_and_bad_input():
    assert future_kl(torch.zeros(2, 0), torch.zeros(2, 0), 0.9).shape == (2, 0)
    with pytest.raises(ValueError, match="shape"):
        future_kl(torch.zeros(2, 3), torch.zeros(2, 4), 0.9)
    with pytest.raises(ValueError, match="gamma"):
        discounted_reverse_cumsum(torch.zeros(2, 3), 1.5)
    with pytest.raises(ValueError, match="block_size"):
        future_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.9, block_size=1)
    with pytest.raises(ValueError, match="decay_rate"):
        gamma_from_half_life(0)
    assert math.isclose(gamma_from_half_life(32), 0.978572062087700, rel_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 60), min_size=1, max_size=8),
    half_life=st.floats(0.5, 4096.0),
    seed=st.integers(0, 2**16),
)
def test_sharded_combine_equals_unsharded(cuts, half_life, seed):
    """Split the sequence into 1..8 shards of unequal length, as sequence-parallel ranks do."""
    gen = torch.Generator().manual_seed(seed)
    length = sum(cuts)
    log_ratio = torch.randn(3, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, length, generator=gen) > 0.2
    gamma = gamma_from_half_life(half_life)
    full = future_kl(log_ratio, mask, gamma)

    bounds = [0]
    for c in cuts:
        bounds.append(bounds[-1] + c)
    locals_ = [
        future_kl(log_ratio[:, a:b], mask[:, a:b], gamma) for a, b in itertools.pairwise(bounds)
    ]
    heads = torch.stack([loc[:, 0] for loc in locals_], dim=1)  # what ranks all-gather
    carries = shard_carries(heads, cuts, gamma)
    stitched = torch.cat(
        [combine_sharded_future_kl(loc, carries[:, r], gamma) for r, loc in enumerate(locals_)],
        dim=1,
    )
    assert_rel_close(stitched, full, 1e-10)


def test_sharded_combine_detects_wrong_carry():
    """The stitching test can fail: dropping the carry changes the result."""
    gamma = gamma_from_half_life(32)
    log_ratio = torch.randn(1, 40, dtype=torch.float64)
    mask = torch.ones(1, 40, dtype=torch.bool)
    full = future_kl(log_ratio, mask, gamma)
    first = future_kl(log_ratio[:, :20], mask[:, :20], gamma)
    assert not torch.allclose(first, full[:, :20])
