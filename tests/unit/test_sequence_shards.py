"""Sequence-parallel shards: Future-KL, FIPO and vanilla losses over k simulated ranks.

Each "rank" is a Python thread holding a ``SequenceShards`` whose ``all_gather`` is a real
collective among the threads, so the library code runs exactly as under a gloo group. A
rank sees what ``PolicyTrainer.update`` gives it: log-probs at its own tokens (0 elsewhere)
and ``response_mask * shards.owned(width)``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest
import torch

from fipo_trainer.algorithms.aggregation import AGG_MODES, aggregate_loss
from fipo_trainer.algorithms.future_kl import future_kl, gamma_from_half_life
from fipo_trainer.algorithms.policy_loss import (
    POLICY_LOSSES,
    PolicyLossConfig,
    PolicyLossTerms,
    compute_policy_terms,
    register_policy_loss,
)
from fipo_trainer.algorithms.sequence_shards import (
    SequenceShards,
    row_segments,
    sharded_future_kl,
)

# ----------------------------------------------------------------------------- k threads


class _ThreadGroup:
    """An all-gather among ``size`` threads (slot per rank, barrier, stack, barrier)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.calls = [0] * size

    def all_gather_for(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_gather(x: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = x.detach().clone()
            self.barrier.wait()
            out = torch.stack(self.slots)  # type: ignore[arg-type]
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return out

        return all_gather


def run_ranks(size: int, fn: Callable[[int, Callable], object]) -> list:
    """Run ``fn(rank, all_gather)`` on ``size`` threads; results in rank order."""
    group = _ThreadGroup(size)
    results: list = [None] * size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, group.all_gather_for(rank))
        except BaseException as exc:
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    assert len(set(group.calls)) == 1, f"ranks made different numbers of collectives: {group.calls}"
    return results


def make_shards(
    rank: int, lengths: list[int], slices: list[tuple[int, int]], all_gather
) -> SequenceShards:
    starts, ends = row_segments(lengths, slices)
    return SequenceShards(rank, starts, ends, all_gather)


def response_mask(lengths: list[int], width: int, dtype=torch.float64) -> torch.Tensor:
    cols = torch.arange(width)[None, :]
    return (cols < torch.tensor(lengths)[:, None]).to(dtype)


def contiguous_slices(cuts: list[int]) -> list[tuple[int, int]]:
    return [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]


# ----------------------------------------------------------------------------- Future-KL

# Rows (packed back to back): r0 [0,5) r1 empty r2 [5,6) (length 1) r3 [6,13) r4 [13,16)
# r5 [16,25) (fills the width, so a rank after it has start == width). K = 25.
FKL_LENGTHS = [5, 0, 1, 7, 3, 9]
FKL_WIDTH = 9
FKL_CUTS = {
    "k2_cut_in_r3": [0, 9, 25],
    "k2_empty_last": [0, 25, 25],
    "k2_empty_first": [0, 0, 25],
    "k3_odd_cuts": [0, 2, 14, 25],  # cuts r0 at 2 and r4 at 1
    "k3_empty_middle": [0, 11, 11, 25],
    "k3_at_row_edges": [0, 5, 13, 25],  # every row entirely inside one shard
    "k4_row_over_four": [0, 7, 9, 11, 25],  # r3 spans all four ranks
    "k4_empty_and_odd": [0, 3, 3, 18, 25],
    "k4_empty_tail": [0, 1, 17, 25, 25],
}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("case", sorted(FKL_CUTS))
@pytest.mark.parametrize("gamma", [gamma_from_half_life(2.0), 1.0])
def test_sharded_future_kl_equals_full_rows(case, dtype, tol, gamma):
    lengths, width = FKL_LENGTHS, FKL_WIDTH
    slices = contiguous_slices(FKL_CUTS[case])
    size = len(slices)
    g = torch.Generator().manual_seed(7)
    log_ratio = (0.3 * torch.randn(len(lengths), width, generator=g, dtype=torch.float64)).to(dtype)
    participation = torch.rand(len(lengths), width, generator=g) > 0.2
    mask = response_mask(lengths, width).bool() & participation
    expected = future_kl(log_ratio, mask, gamma)

    def rank_fn(rank, all_gather):
        shards = make_shards(rank, lengths, slices, all_gather)
        owned = shards.owned(width)
        # What a rank really holds: garbage where it does not own the token.
        local_ratio = torch.where(owned, log_ratio, torch.full_like(log_ratio, 123.0))
        out = sharded_future_kl(local_ratio, mask & owned, gamma, shards)
        return owned, out

    owned_total = torch.zeros(len(lengths), width, dtype=torch.long)
    for owned, out in run_ranks(size, rank_fn):
        owned_total += owned.long()
        assert out.dtype == dtype
        torch.testing.assert_close(out[owned], expected[owned], rtol=0, atol=tol)
        assert torch.all(out[~owned] == 0)
    # The shards cover each response token exactly once (so every position was compared).
    torch.testing.assert_close(owned_total, response_mask(lengths, width, torch.long))


def test_sharded_future_kl_without_shards_is_future_kl():
    lr = torch.randn(3, 6, dtype=torch.float64)
    m = torch.ones(3, 6, dtype=torch.bool)
    torch.testing.assert_close(sharded_future_kl(lr, m, 0.9, None), future_kl(lr, m, 0.9))


# ----------------------------------------------------------------------------- FIPO loss

# Rows: r0 length 6, r1 length 0, r2 length 1, r3 length 9 (two dual-clipped tokens, far
# apart), r4 length 7 (one dual-clipped token), r5 length 4. K = 27.
LOSS_LENGTHS = [6, 0, 1, 9, 7, 4]
LOSS_WIDTH = 10
DUAL_ROW, DUAL_COLS = 3, (1, 7)  # 2 dual-clipped tokens: the response leaves the loss
SINGLE_ROW, SINGLE_COL = 4, 2  # 1 dual-clipped token: the response stays
# Response offsets: r0 0, r2 6, r3 7 (cols 1, 7 -> packed 8, 14), r4 16, r5 23.
LOSS_CUTS = {
    2: [[0, 11, 27], [0, 4, 27]],  # 1st: r3 cut between its dual tokens; 2nd: inside r0
    3: [[0, 9, 15, 27], [0, 10, 10, 27], [0, 3, 20, 27]],
}
WIDE = dict(future_kl_clip_ratio=0.9, future_kl_clip_high_only=False, decay_rate=3.0)


def _loss_inputs(dtype=torch.float64):
    """old_log_prob, log_prob, advantages, mask with varied ratios and two dual-clip rows."""
    lengths, width = LOSS_LENGTHS, LOSS_WIDTH
    g = torch.Generator().manual_seed(11)
    b = len(lengths)
    log_prob = -torch.rand(b, width, generator=g, dtype=torch.float64) * 3 - 0.05
    delta = 0.6 * torch.randn(b, width, generator=g, dtype=torch.float64)
    delta = delta.clamp(-2.0, 1.5)  # ratio < e^1.5 < c = 10: no dual clip by chance
    old = log_prob - delta
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    adv = sign[:, None] * (0.5 + torch.rand(b, width, generator=g, dtype=torch.float64))
    # Negative advantages with ratio in [2, 3), [3, 4), [4, 10) somewhere (tail metrics).
    old[0, 1] = log_prob[0, 1] - math.log(2.5)
    adv[0, 1] = -1.0
    old[5, 2] = log_prob[5, 2] - math.log(3.5)
    adv[5, 2] = -0.7
    old[4, 5] = log_prob[4, 5] - math.log(6.0)
    # A positive-advantage token with ratio < 1e-3 (pos_mini_frac).
    old[5, 0] = log_prob[5, 0] + 8.0
    for col in DUAL_COLS:
        old[DUAL_ROW, col] = log_prob[DUAL_ROW, col] - 3.0  # ratio e^3 > 10, A < 0
    old[SINGLE_ROW, SINGLE_COL] = log_prob[SINGLE_ROW, SINGLE_COL] - 3.0
    mask = response_mask(lengths, width)
    # Padding holds junk log-probs; the mask must make it irrelevant.
    return old.to(dtype), log_prob.to(dtype), adv.to(dtype), mask.to(dtype)


def _run_sharded_loss(name, slices, config, dtype=torch.float64, with_grad=True):
    """Per rank: (owned, terms, {mode: loss}, {mode: grad of that rank's loss})."""
    old, log_prob, adv, mask = _loss_inputs(dtype)
    lengths, width = LOSS_LENGTHS, LOSS_WIDTH

    def rank_fn(rank, all_gather):
        shards = make_shards(rank, lengths, slices, all_gather)
        owned = shards.owned(width)
        leaf = log_prob.clone().requires_grad_(with_grad)
        local_logp = torch.where(owned, leaf, torch.zeros_like(leaf))  # as shard.place does
        own_mask = mask * owned
        terms = compute_policy_terms(name, old, local_logp, adv, own_mask, config, shards)
        row_counts = shards.sum(terms.loss_mask.sum(-1))
        losses = {
            m: aggregate_loss(terms.loss_mat, terms.loss_mask, m, row_counts=row_counts)
            for m in AGG_MODES
        }
        return owned, leaf, terms, losses

    results = run_ranks(len(slices), rank_fn)
    out = []
    for owned, leaf, terms, losses in results:
        grads = {}
        if with_grad:
            for m, loss in losses.items():
                (grads[m],) = torch.autograd.grad(loss, leaf, retain_graph=True)
        out.append((owned, terms, losses, grads))
    return out


def _unsharded(name, config, dtype=torch.float64):
    old, log_prob, adv, mask = _loss_inputs(dtype)
    leaf = log_prob.clone().requires_grad_(True)
    terms = compute_policy_terms(name, old, leaf, adv, mask, config)
    losses = {m: aggregate_loss(terms.loss_mat, terms.loss_mask, m) for m in AGG_MODES}
    grads = {}
    for m, loss in losses.items():
        (grads[m],) = torch.autograd.grad(loss, leaf, retain_graph=True)
    return terms, losses, grads


def _all_slices():
    return [
        pytest.param(contiguous_slices(c), id=f"k{k}-{'-'.join(map(str, c))}")
        for k, cuts in LOSS_CUTS.items()
        for c in cuts
    ]


def _boundary_positions(slices):
    """(row, col) of the response tokens right before and right after each shard boundary."""
    lengths = LOSS_LENGTHS
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    where = {}
    for i, (off, n) in enumerate(zip(offsets, lengths)):
        for c in range(n):
            where[off + c] = (i, c)
    out = set()
    for lo, _hi in slices[1:]:
        for j in (lo - 1, lo):
            if j in where:
                out.add(where[j])
    return sorted(out)


@pytest.mark.parametrize("slices", _all_slices())
@pytest.mark.parametrize("config_kw", [WIDE, {"future_kl_clip_ratio": 0.0, "decay_rate": 4.0}])
def test_fipo_influence_weights_match_unsharded(slices, config_kw):
    config = PolicyLossConfig(**config_kw)
    full, _, _ = _unsharded("fipo", config)
    ranks = _run_sharded_loss("fipo", slices, config, with_grad=False)
    boundary = _boundary_positions(slices)
    assert boundary, "the cut must fall inside the responses"
    seen = torch.zeros(len(LOSS_LENGTHS), LOSS_WIDTH, dtype=torch.bool)
    for owned, terms, _, _ in ranks:
        for key in ("influence_weights", "raw_influence_weights"):
            torch.testing.assert_close(
                terms.token_stats[key][owned], full.token_stats[key][owned], rtol=1e-12, atol=0
            )
        for r, c in boundary:
            if owned[r, c]:
                seen[r, c] = True
                assert terms.token_stats["influence_weights"][r, c].item() == pytest.approx(
                    full.token_stats["influence_weights"][r, c].item(), rel=1e-12
                )
    assert all(seen[r, c] for r, c in boundary)
    # The weights are not a constant clip value: the comparison can see a missing carry.
    w = full.token_stats["influence_weights"][response_mask(LOSS_LENGTHS, LOSS_WIDTH).bool()]
    assert w.unique().numel() > 10


def test_fipo_influence_weights_float32():
    slices = contiguous_slices([0, 9, 15, 27])
    config = PolicyLossConfig(**WIDE)
    full, _, _ = _unsharded("fipo", config, torch.float32)
    for owned, terms, _, _ in _run_sharded_loss(
        "fipo", slices, config, torch.float32, with_grad=False
    ):
        torch.testing.assert_close(
            terms.token_stats["influence_weights"][owned],
            full.token_stats["influence_weights"][owned],
            rtol=0,
            atol=1e-6,
        )


@pytest.mark.parametrize("slices", _all_slices())
def test_fipo_dual_clip_invalidation_counts_across_shards(slices):
    config = PolicyLossConfig()
    full, _, _ = _unsharded("fipo", config)
    mask = response_mask(LOSS_LENGTHS, LOSS_WIDTH)
    # The unsharded loss drops the 2-token response and keeps the 1-token one.
    assert torch.all(full.loss_mask[DUAL_ROW] == 0)
    torch.testing.assert_close(full.loss_mask[SINGLE_ROW], mask[SINGLE_ROW])
    ranks = _run_sharded_loss("fipo", slices, config, with_grad=False)
    owners = {
        col: next(r for r, (o, *_) in enumerate(ranks) if o[DUAL_ROW, col]) for col in DUAL_COLS
    }
    for rank, (owned, terms, _, _) in enumerate(ranks):
        assert torch.all(terms.loss_mask[DUAL_ROW] == 0), f"rank {rank} kept the dual-clipped row"
        torch.testing.assert_close(terms.loss_mask, full.loss_mask * owned)
        assert terms.metrics["invalid_seq_frac"] == full.metrics["invalid_seq_frac"]
    if owners[DUAL_COLS[0]] != owners[DUAL_COLS[1]]:
        # Each shard alone sees one dual-clipped token: only the cross-shard count drops it.
        assert owners[DUAL_COLS[0]] < owners[DUAL_COLS[1]]


def test_dual_clipped_tokens_sit_on_different_shards():
    """The invalidation test above really exercises a cut between the two tokens."""
    offsets = [sum(LOSS_LENGTHS[:i]) for i in range(len(LOSS_LENGTHS))]
    a, b = (offsets[DUAL_ROW] + c for c in DUAL_COLS)
    for k, cuts in LOSS_CUTS.items():
        assert any(any(a < cut <= b for cut in c[1:-1]) for c in cuts), k


@pytest.mark.parametrize("slices", _all_slices())
def test_fipo_sharded_loss_and_gradient_sum_to_unsharded(slices):
    config = PolicyLossConfig(**WIDE)
    _, full_losses, full_grads = _unsharded("fipo", config)
    ranks = _run_sharded_loss("fipo", slices, config)
    for mode in AGG_MODES:
        total = sum(losses[mode].detach() for _, _, losses, _ in ranks)
        torch.testing.assert_close(total, full_losses[mode].detach(), rtol=1e-12, atol=1e-14)
        grad = sum(grads[mode] for _, _, _, grads in ranks)
        torch.testing.assert_close(grad, full_grads[mode], rtol=1e-12, atol=1e-14)
        assert full_grads[mode].abs().sum() > 0
        for owned, _, _, grads in ranks:  # a rank's gradient lives on its own tokens
            assert torch.all(grads[mode][~owned] == 0)


FRACTION_AND_MOMENT_METRICS = {
    "pg_clipfrac",
    "ppo_kl",
    "pg_clipfrac_lower",
    "influence_weights_mean",
    "influence_weights_min",
    "influence_weights_max",
    "influence_weights_mean_raw",
    "raw_influence_weights_min",
    "raw_influence_weights_max",
    "IW_upper_clip_ratio",
    "IW_lower_clip_ratio",
    "IW_overall_clip_ratio",
    "invalid_seq_frac",
    "neg_ratio_2_3",
    "neg_ratio_3_4",
    "neg_ratio_4_10",
    "pos_mini_frac",
    "neg_is_max",
    "pos_is_min",
    "pos_is_max",
}
QUANTILE_METRICS = {
    "neg_is_p75",
    "neg_is_p995",
    "neg_is_p999",
    "pos_is_p25",
    "pos_is_median",
    "pos_is_p75",
    "pos_is_p995",
    "pos_is_p999",
}


def _assert_metrics_equal(sharded: dict, full: dict, names: set[str]) -> None:
    assert set(sharded) == set(full)
    for name in names:
        assert sharded[name] == pytest.approx(full[name], rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("slices", _all_slices())
@pytest.mark.parametrize("config_kw", [{}, WIDE])
def test_fipo_metrics_match_unsharded(slices, config_kw):
    config = PolicyLossConfig(**config_kw)
    full, _, _ = _unsharded("fipo", config)
    assert set(full.metrics) >= FRACTION_AND_MOMENT_METRICS | QUANTILE_METRICS
    # The inputs make the metrics informative (a shard alone would give other values).
    for name in ("neg_ratio_2_3", "neg_ratio_3_4", "neg_ratio_4_10", "pos_mini_frac"):
        assert full.metrics[name] > 0, name
    assert 0 < full.metrics["pg_clipfrac"] < 1
    for _, terms, _, _ in _run_sharded_loss("fipo", slices, config, with_grad=False):
        _assert_metrics_equal(terms.metrics, full.metrics, FRACTION_AND_MOMENT_METRICS)
        _assert_metrics_equal(terms.metrics, full.metrics, QUANTILE_METRICS)


# ----------------------------------------------------------------------------- vanilla


@pytest.mark.parametrize("slices", _all_slices())
def test_vanilla_metrics_and_loss_match_unsharded(slices):
    config = PolicyLossConfig()
    full, full_losses, full_grads = _unsharded("vanilla", config)
    ranks = _run_sharded_loss("vanilla", slices, config)
    assert 0 < full.metrics["pg_clipfrac"] < 1 and full.metrics["pg_clipfrac_lower"] > 0
    for owned, terms, _, _ in ranks:
        _assert_metrics_equal(terms.metrics, full.metrics, set(full.metrics))
        torch.testing.assert_close(terms.loss_mask, full.loss_mask * owned)
    for mode in AGG_MODES:
        total = sum(losses[mode].detach() for _, _, losses, _ in ranks)
        torch.testing.assert_close(total, full_losses[mode].detach(), rtol=1e-12, atol=1e-14)
        grad = sum(grads[mode] for _, _, _, grads in ranks)
        torch.testing.assert_close(grad, full_grads[mode], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- refusal


def test_loss_without_shards_parameter_is_refused_under_sequence_parallel():
    name = "test_sequence_shards_plain_loss"
    calls = []

    @register_policy_loss(name)
    def plain_loss(old_log_prob, log_prob, advantages, response_mask, config):
        calls.append(1)
        return PolicyLossTerms(-advantages * log_prob, response_mask)

    try:
        old, log_prob, adv, mask = _loss_inputs()
        compute_policy_terms(name, old, log_prob, adv, mask)  # fine without shards
        assert calls == [1]
        starts, ends = row_segments(LOSS_LENGTHS, contiguous_slices([0, 10, 27]))
        shards = SequenceShards(0, starts, ends, lambda x: x[None])
        with pytest.raises(ValueError, match=r"actor\.ulysses_sequence_parallel_size") as err:
            compute_policy_terms(name, old, log_prob, adv, mask * shards.owned(10), shards=shards)
        assert name in str(err.value)
        assert calls == [1], "the loss must be refused before it runs"
    finally:
        POLICY_LOSSES.pop(name, None)
