"""Micro-batches with the global normaliser reproduce the full-batch loss and gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from fipo_trainer.algorithms.aggregation import AGG_MODES, aggregate_loss, local_denominator
from fipo_trainer.algorithms.metrics import reduce_metrics
from fipo_trainer.algorithms.policy_loss import (
    PolicyLossConfig,
    compute_policy_loss,
    compute_policy_terms,
)


def make_batch(seed=0, batch=10, length=30):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 2
    new = (
        old + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 1.5
    ).requires_grad_(True)
    adv = torch.randn(batch, 1, generator=gen, dtype=torch.float64).expand(batch, length).clone()
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)  # includes empty responses
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    return old, new, adv, mask


def test_modes_on_a_hand_example():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(
        10 / (2 * 3)
    )
    assert aggregate_loss(
        loss, mask, "seq-mean-token-sum-norm", norm_length=5
    ).item() == pytest.approx(1.0)
    assert aggregate_loss(loss, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(loss, mask, "sum")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss_name", ["vanilla", "fipo"])
@pytest.mark.parametrize("cuts", [[10], [3, 7], [1, 2, 3, 4], [5, 0, 5]])
def test_micro_batches_with_global_denominator_reproduce_full_batch(mode, loss_name, cuts):
    cfg = PolicyLossConfig(loss_agg_mode=mode, clip_ratio_c=3.0, loss_norm_length=40.0)
    old, new, adv, mask = make_batch()
    full, _ = compute_policy_loss(loss_name, old, new, adv, mask, cfg)
    (full_grad,) = torch.autograd.grad(full, new)

    # Pass 1 (no grad): each micro-batch's share of the normaliser, summed (an all-reduce in
    # the actor). Pass 2: backward each micro-batch loss against the global normaliser.
    bounds = torch.tensor([0, *cuts]).cumsum(0).tolist()
    parts = list(itertools.pairwise(bounds))
    with torch.no_grad():
        denom = sum(
            local_denominator(
                compute_policy_terms(
                    loss_name, old[a:b], new[a:b], adv[a:b], mask[a:b], cfg
                ).loss_mask,
                mode,
                cfg.loss_norm_length,
            )
            for a, b in parts
        )
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros_like(new)
    for a, b in parts:
        part_loss, _ = compute_policy_loss(
            loss_name, old[a:b], new[a:b], adv[a:b], mask[a:b], cfg, global_denominator=denom
        )
        (g,) = torch.autograd.grad(part_loss, new, allow_unused=True)
        grad += g if g is not None else 0
        total += part_loss.detach()
    assert total.item() == pytest.approx(full.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, full_grad, rtol=1e-10, atol=1e-14)


def test_fipo_drops_sequences_so_the_batch_is_meaningful():
    """Guard: the FIPO case above really exercises sequence invalidation."""
    old, new, adv, mask = make_batch()
    terms = compute_policy_terms("fipo", old, new, adv, mask, PolicyLossConfig(clip_ratio_c=3.0))
    assert terms.loss_mask.sum() < mask.sum()


def test_reduce_metrics():
    out = reduce_metrics(
        [{"a": 1.0, "x_max": 3.0, "x_min": 1.0}, {"a": 4.0, "x_max": 2.0, "x_min": 0.5}], [1, 3]
    )
    assert out == {"a": pytest.approx(13 / 4), "x_max": 3.0, "x_min": 0.5}
