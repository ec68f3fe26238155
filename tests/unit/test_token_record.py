"""Token records: the update's per-token values of sampled rows equal the loss's own.

The loss's own values come from registered losses that wrap ``fipo`` / ``vanilla`` and
keep every call's inputs and ``PolicyLossTerms`` (the registry is the loss's extension
point, nothing is patched); each call's rows are matched to batch rows by their old
log-probs, so "the last mini-batch that saw a row" is read off the calls themselves.
The sequence-parallel check runs the loss on k thread "ranks" (the harness of
``test_sequence_shards.py``) and compares the stitched records with the unsharded ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from fipo_trainer.actor.token_record import RECORD_FIELDS, TokenRecorder
from fipo_trainer.algorithms.future_kl import future_kl, gamma_from_half_life
from fipo_trainer.algorithms.policy_loss import (
    PolicyLossConfig,
    compute_policy_terms,
    fipo_policy_loss,
    register_policy_loss,
    vanilla_policy_loss,
)
from fipo_trainer.trainer.token_record import record_kwargs, sample_rows
from tests.unit.test_policy_trainer import (
    ROWS,
    make_config,
    make_trainer,
    model_path,  # noqa: F401  (fixture)
    off_policy_batch,
)
from tests.unit.test_sequence_shards import (
    DUAL_ROW,
    LOSS_CUTS,
    LOSS_LENGTHS,
    LOSS_WIDTH,
    WIDE,
    _loss_inputs,
    contiguous_slices,
    make_shards,
    run_ranks,
)

CALLS: dict[str, list[tuple[torch.Tensor, object]]] = {"fipo": [], "vanilla": []}


@register_policy_loss("test_token_spy_fipo")
def _spy_fipo(old_log_prob, log_prob, advantages, response_mask, config, shards=None):
    terms = fipo_policy_loss(old_log_prob, log_prob, advantages, response_mask, config, shards)
    CALLS["fipo"].append((old_log_prob.detach().clone(), terms))
    return terms


@register_policy_loss("test_token_spy_vanilla")
def _spy_vanilla(old_log_prob, log_prob, advantages, response_mask, config, shards=None):
    terms = vanilla_policy_loss(old_log_prob, log_prob, advantages, response_mask, config, shards)
    CALLS["vanilla"].append((old_log_prob.detach().clone(), terms))
    return terms


def last_terms_by_row(calls, old_log_probs: torch.Tensor) -> dict[int, tuple[int, object, int]]:
    """batch row -> (index of the last loss call that held it, its terms, its row there)."""
    out = {}
    for k, (old, terms) in enumerate(calls):
        for j in range(old.shape[0]):
            (match,) = [r for r in range(len(old_log_probs)) if torch.equal(old_log_probs[r], old[j])]
            out[match] = (k, terms, j)
    return out


def as_list(t: torch.Tensor) -> list:
    return t.double().tolist() if t.dtype != torch.bool else t.tolist()


@pytest.mark.parametrize("epochs", [1, 2])
def test_fipo_records_equal_the_loss_of_the_last_mini_batch(model_path, epochs):  # noqa: F811
    cfg = make_config(
        model_path, loss_name="test_token_spy_fipo", ppo_epochs=epochs, ppo_max_token_len_per_gpu=40
    )
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer)
    CALLS["fipo"].clear()
    wanted = [0, 2, 3, 5, 6]
    trainer.update(batch, mini_batch_rows=4, temperature=1.0, global_step=1, record_rows=wanted)
    records = trainer.token_records
    assert sorted(records) == wanted
    calls = CALLS["fipo"]
    assert len(calls) > 2 * epochs  # a 40-token budget cuts each mini-batch into micro-batches
    last = last_terms_by_row(calls, batch["old_log_probs"])
    mask = batch["response_mask"].bool()
    any_dropped = any_dual = any_weight = False
    for row in wanted:
        rec = records[row]
        _, terms, j = last[row]
        m = mask[row]
        n = int(m.sum())
        assert set(rec) == {"mini_batch", *RECORD_FIELDS}
        for field in ("ratio", "future_kl", "influence_weight", "clipped", "dual_clipped"):
            assert len(rec[field]) == n, field
        stats = terms.token_stats
        assert rec["influence_weight"] == as_list(stats["influence_weights"][j][m])
        assert rec["ratio"] == as_list(stats["ratio"][j][m])
        assert rec["future_kl"] == as_list(stats["future_kl"][j][m])
        assert rec["clipped"] == as_list(stats["clipped"][j][m])
        assert rec["dual_clipped"] == as_list(stats["dual_clipped"][j][m])
        # ...and are what they say: F_t = sum_k gamma^(k-t) log r_k over participating k
        log_r = torch.log(torch.tensor(rec["ratio"], dtype=torch.float64))[None]
        joins = log_r <= math.log(cfg.policy_loss.clip_ratio_c)
        gamma = gamma_from_half_life(cfg.policy_loss.decay_rate)
        expected = future_kl(log_r, joins, gamma)[0].tolist()
        assert rec["future_kl"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        dropped = bool((terms.loss_mask[j][m] == 0).any())
        assert rec["dropped"] is dropped
        # the optimizer step (mini-batch) of the last pass over the row
        assert rec["mini_batch"] == (epochs - 1) * 2 + row // 4
        any_dropped |= dropped
        any_dual |= any(rec["dual_clipped"])
        any_weight |= any(w != 1.0 for w in rec["influence_weight"])
    assert any_weight  # a moved policy: Future-KL re-weights tokens
    if epochs == 1:  # the batch's 2-dual-clip response is recorded and dropped
        assert any_dropped and any_dual


def test_vanilla_records_ratio_and_clip_flags_and_null_fipo_fields(model_path):  # noqa: F811
    cfg = make_config(model_path, loss_name="test_token_spy_vanilla")
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer)
    CALLS["vanilla"].clear()
    trainer.update(batch, mini_batch_rows=ROWS, temperature=1.0, global_step=1, record_rows=[1, 4])
    last = last_terms_by_row(CALLS["vanilla"], batch["old_log_probs"])
    for row, rec in trainer.token_records.items():
        _, terms, j = last[row]
        m = batch["response_mask"][row].bool()
        assert rec["ratio"] == as_list(terms.token_stats["ratio"][j][m])
        assert rec["dual_clipped"] == as_list(terms.token_stats["dual_clipped"][j][m])
        assert rec["clipped"] == as_list(terms.token_stats["clipped"][j][m])
        assert rec["future_kl"] is None and rec["influence_weight"] is None
        assert rec["dropped"] is None


def test_recording_does_not_change_the_update(model_path):  # noqa: F811
    cfg = make_config(model_path)
    plain, recorded = make_trainer(cfg), make_trainer(cfg)
    a = plain.update(off_policy_batch(plain), mini_batch_rows=4, temperature=1.0, global_step=1)
    b = recorded.update(
        off_policy_batch(recorded),
        mini_batch_rows=4,
        temperature=1.0,
        global_step=1,
        record_rows=list(range(ROWS)),
    )
    assert plain.token_records == {} and len(recorded.token_records) == ROWS
    a.pop("actor/update_time_s"), b.pop("actor/update_time_s")
    a.pop("actor/tokens_per_s"), b.pop("actor/tokens_per_s")
    assert a == b
    for p, q in zip(plain.engine.module.parameters(), recorded.engine.module.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- shards


def _records(name: str, config: PolicyLossConfig, slices=None, rows=(0, 2, 3, 4, 5)):
    """Records of local rows 10 + r (a micro-batch's rows need not start at 0)."""
    old, log_prob, adv, mask = _loss_inputs()
    idx = torch.arange(len(LOSS_LENGTHS)) + 10
    wanted = [10 + r for r in rows]
    if slices is None:
        terms = compute_policy_terms(name, old, log_prob, adv, mask, config)
        recorder = TokenRecorder(wanted)
        recorder.observe(idx, 3, terms.token_stats, mask)
        return recorder.records()

    def rank_fn(rank, all_gather):
        shards = make_shards(rank, LOSS_LENGTHS, slices, all_gather)
        owned = shards.owned(LOSS_WIDTH)
        local = torch.where(owned, log_prob, torch.zeros_like(log_prob))
        terms = compute_policy_terms(name, old, local, adv, mask * owned, config, shards)
        recorder = TokenRecorder(wanted)
        recorder.observe(idx, 3, terms.token_stats, mask, shards)
        return recorder.records()

    return run_ranks(len(slices), rank_fn)


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for row in a:
        for field in RECORD_FIELDS:
            x, y = a[row][field], b[row][field]
            if isinstance(x, list) and x and isinstance(x[0], float):
                assert x == pytest.approx(y, rel=1e-12, abs=1e-14), (row, field)
            else:
                assert x == y, (row, field)
        assert a[row]["mini_batch"] == b[row]["mini_batch"] == 3


@pytest.mark.parametrize(
    "cuts", [c for k in sorted(LOSS_CUTS) for c in LOSS_CUTS[k]], ids=lambda c: "-".join(map(str, c))
)
@pytest.mark.parametrize("name", ["fipo", "vanilla"])
def test_sharded_records_equal_the_unsharded_ones(cuts, name):
    config = PolicyLossConfig(**WIDE) if name == "fipo" else PolicyLossConfig()
    full = _records(name, config)
    assert [len(full[10 + r]["ratio"]) for r in (0, 2, 3, 4, 5)] == [6, 1, 9, 7, 4]
    if name == "fipo":
        assert full[10 + DUAL_ROW]["dropped"] is True and full[10 + 4]["dropped"] is False
        assert len({w for rec in full.values() for w in rec["influence_weight"]}) > 10
    for rank_records in _records(name, config, contiguous_slices(cuts)):
        _assert_same(rank_records, full)


# ----------------------------------------------------------------------------- sampling


def test_rows_are_sampled_only_on_dump_steps():
    class Cfg:
        rollout_dump_freq = 2
        token_record_samples = 4

    assert sample_rows(128, 8) == [0, 16, 32, 48, 64, 80, 96, 112]
    assert sample_rows(3, 8) == [0, 1, 2] and sample_rows(5, 0) == []
    assert record_kwargs(Cfg, 1, 16) == {}
    assert record_kwargs(Cfg, 2, 16) == {"record_rows": [0, 4, 8, 12]}
    Cfg.token_record_samples = 0
    assert record_kwargs(Cfg, 2, 16) == {}
