"""Metrics of empty token subsets: left out (global), verl's 0.0 (loss_scale: reference).

Why: under ``global`` a micro-batch without e.g. positive-advantage tokens used to report
``pos_is_min = 0.0``, which the min over micro-batches then returned, and its quantiles
were 0.0 values in the token-weighted mean. verl 0.5 logs 0.0 there and takes the plain
mean over micro-batches; ``reference`` keeps that.
"""

from __future__ import annotations

import pytest
import torch

from fipo_trainer.actor.comm import Collectives
from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.policy_trainer import PolicyTrainer
from fipo_trainer.actor.synthetic_batch import random_rollout_batch
from fipo_trainer.algorithms.loss_metrics import (
    EMPTY_SUBSET_METRICS,
    influence_metrics,
    quantiles,
    ratio_tail_metrics,
    token_weighted_parts,
    with_empty_subset_zeros,
)
from fipo_trainer.algorithms.metrics import reduce_metrics
from fipo_trainer.algorithms.policy_loss import PolicyLossConfig, compute_policy_terms
from fipo_trainer.data.tiny_model import build_tiny_model
from tests.helpers.torch_engine import TorchEngine

NEG_KEYS = {"neg_is_max", "neg_is_p75", "neg_is_p995", "neg_is_p999"}
POS_KEYS = {"pos_is_min", "pos_is_p25", "pos_is_median", "pos_is_p75", "pos_is_p995"}
POS_KEYS |= {"pos_is_p999", "pos_is_max"}
IW_KEYS = {"influence_weights_min", "influence_weights_max"}
IW_KEYS |= {"raw_influence_weights_min", "raw_influence_weights_max"}


def _fipo_micro(sign: float, seed: int) -> dict[str, float]:
    """One FIPO micro-batch's metrics (bare names) whose tokens all have advantage ``sign``."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(2, 5, generator=g) * 0.3 - 2
    new = old + 0.2 * torch.randn(2, 5, generator=g)
    adv = torch.full((2, 5), sign)
    terms = compute_policy_terms("fipo", old, new, adv, torch.ones(2, 5), PolicyLossConfig())
    return terms.metrics


def _finish(loss_scale: str, micros: list[dict[str, float]]) -> dict[str, float]:
    """The update's reduction of one optimizer step's micro-batch metrics (weight 10 each)."""
    cfg = ActorConfig(model_path="unused", loss_scale=loss_scale)
    trainer = PolicyTrainer(cfg, engine=None, comm=Collectives(1))  # type: ignore[arg-type]
    step = {"actor/lr": 1.0, "_tokens": 20.0, "_response_tokens": 20.0}
    records = [(0, {f"actor/{k}": v for k, v in m.items()}, 10.0) for m in micros]
    return trainer._finish_metrics(records, [step], 1.0)


def test_empty_subsets_are_left_out_not_zero():
    ratio = torch.tensor([0.5, 1.5, 2.5])
    only_pos = ratio_tail_metrics({"ratio": ratio, "advantages": torch.ones(3)}, 10.0)
    assert set(only_pos) >= POS_KEYS and not NEG_KEYS & set(only_pos)
    assert only_pos["pos_is_min"] == 0.5 and only_pos["pos_is_median"] == 1.5
    assert only_pos["neg_ratio_2_3"] == 0.0  # fractions of all tokens stay
    only_neg = ratio_tail_metrics({"ratio": ratio, "advantages": -torch.ones(3)}, 10.0)
    assert set(only_neg) >= NEG_KEYS and not POS_KEYS & set(only_neg)
    empty = torch.zeros(0)
    iw = influence_metrics({"weights": empty, "raw": empty}, 0.8, 1.2)
    assert not IW_KEYS & set(iw) and iw["influence_weights_mean"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        quantiles(empty, [0.5])


def test_global_reduction_ignores_a_micro_batch_without_the_subset():
    pos, neg = _fipo_micro(1.0, 0), _fipo_micro(-1.0, 1)
    assert "pos_is_min" not in neg and "neg_is_p75" not in pos
    out = _finish("global", [pos, neg])
    for key in POS_KEYS:
        assert out[f"actor/{key}"] == pytest.approx(pos[key]), key
    for key in NEG_KEYS:
        assert out[f"actor/{key}"] == pytest.approx(neg[key]), key
    assert out["actor/pos_is_min"] > 0.5 and out["actor/neg_is_p75"] > 0.5


def test_a_subset_empty_in_every_micro_batch_is_absent():
    out = _finish("global", [_fipo_micro(1.0, 0), _fipo_micro(1.0, 1)])
    assert not {f"actor/{k}" for k in NEG_KEYS} & set(out)
    assert "actor/neg_ratio_2_3" in out and "actor/pos_is_median" in out


def test_reference_keeps_verl_zero_and_plain_mean():
    pos, neg = _fipo_micro(1.0, 0), _fipo_micro(-1.0, 1)
    filled = [with_empty_subset_zeros(m) for m in (pos, neg)]
    out = _finish("reference", filled)
    for key in ("pos_is_min", "pos_is_median", "pos_is_max"):
        assert out[f"actor/{key}"] == pytest.approx(pos[key] / 2), key
    for key in ("neg_is_max", "neg_is_p75"):
        assert out[f"actor/{key}"] == pytest.approx(neg[key] / 2), key


def test_empty_subset_zeros_fill_only_the_families_present():
    bare = _fipo_micro(1.0, 0)
    filled = with_empty_subset_zeros(bare)
    assert all(filled[k] == 0.0 for k in NEG_KEYS)
    assert {k: filled[k] for k in bare} == bare  # present values untouched
    vanilla = {"pg_clipfrac": 0.1, "ppo_kl": 0.0, "pg_clipfrac_lower": 0.0}
    assert with_empty_subset_zeros(vanilla) == vanilla
    no_tokens = influence_metrics({"weights": torch.zeros(0), "raw": torch.zeros(0)}, 0.8, 1.2)
    assert all(with_empty_subset_zeros(no_tokens)[k] == 0.0 for k in IW_KEYS)
    assert set(EMPTY_SUBSET_METRICS) <= set(bare)  # the family markers are real metric names


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"actor/{k}": v for k, v in metrics.items()}


def test_subset_metrics_weigh_by_their_own_tokens():
    """A: one positive token, three negative; B: three positive, one negative (4 tokens)."""
    a = {"ratio": torch.tensor([1.0, 0.5, 1.5, 2.5]), "advantages": torch.tensor([1.0, -1, -1, -1])}
    b = {"ratio": torch.tensor([2.0, 3.0, 4.0, 0.9]), "advantages": torch.tensor([1.0, 1, 1, -1])}
    micros = [_prefixed(ratio_tail_metrics(v, 10.0)) for v in (a, b)]
    parts = [
        p
        for m, v in zip(micros, (a, b))
        for p in token_weighted_parts(m, v["advantages"], torch.ones(4))
    ]
    out = reduce_metrics([m for m, _ in parts], [w for _, w in parts])
    # positive medians by hand: A 1.0 over 1 token, B 3.0 over 3 tokens
    assert out["actor/pos_is_median"] == pytest.approx((1.0 * 1 + 3.0 * 3) / 4)
    # negative p75: A's 0.5, 1.5, 2.5 give 2.0 over 3 tokens; B's lone 0.9 over 1 token
    assert out["actor/neg_is_p75"] == pytest.approx((2.0 * 3 + 0.9 * 1) / 4)
    # fractions of all tokens keep all-token weights: A 1/4 (its 2.5 is negative), B 0
    assert out["actor/neg_ratio_2_3"] == pytest.approx((0.25 * 4 + 0.0 * 4) / 8)
    assert out["actor/pos_is_min"] == 1.0 and out["actor/neg_is_max"] == 2.5
    # weighted by all 4 tokens each, as before, the subsets' values differ: the case matters
    every_token = reduce_metrics(micros, [4.0, 4.0])
    assert every_token["actor/pos_is_median"] == pytest.approx(2.0)
    assert every_token["actor/neg_is_p75"] == pytest.approx(1.45)


def test_token_weighted_parts_count_response_tokens_only():
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    ratio = torch.tensor([[0.9, 1.1, 1.2, 7.0]])
    metrics = ratio_tail_metrics(
        {"ratio": ratio[mask.bool()], "advantages": adv[mask.bool()]}, 10.0
    )
    weight_of = {k: w for part, w in token_weighted_parts(metrics, adv, mask) for k in part}
    assert weight_of["pos_is_median"] == 2.0 and weight_of["pos_is_min"] == 2.0
    assert weight_of["neg_is_p75"] == 1.0 and weight_of["neg_is_max"] == 1.0
    assert weight_of["neg_ratio_2_3"] == 3.0 and weight_of["pos_mini_frac"] == 3.0
    assert set(weight_of) == set(metrics)  # every metric in exactly one part
    only_neg = ratio_tail_metrics({"ratio": ratio[0, :2], "advantages": -torch.ones(2)}, 10.0)
    weights = [w for _, w in token_weighted_parts(only_neg, -torch.ones(2), torch.ones(2))]
    assert sorted(weights) == [2.0, 2.0]  # no positive part: its metrics were left out


@pytest.fixture(scope="module")
def model_path():
    return build_tiny_model()


def _update(model_path, loss_scale: str) -> dict[str, float]:
    """One update over two fixed-size micro-batches: rows 0-3 only A > 0, rows 4-7 only A < 0."""
    cfg = ActorConfig(
        model_path=str(model_path),
        lr=1e-3,
        lr_warmup_steps=0,
        ppo_mini_batch_size=4,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=4,
        loss_scale=loss_scale,
    )
    torch.manual_seed(0)
    trainer = PolicyTrainer(cfg, TorchEngine(cfg), Collectives(1))
    batch = random_rollout_batch(
        num_prompts=4, n=2, vocab_size=200, prompt_width=8, response_width=16,
        min_response_len=4, seed=3,
    )  # fmt: skip
    mask = batch["response_mask"]
    old = trainer.compute_log_prob(batch, mini_batch_rows=8, temperature=1.0)["old_log_probs"]
    noise = 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    batch.tensors["old_log_probs"] = (old + noise) * mask
    sign = torch.tensor([1.0] * 4 + [-1.0] * 4)[:, None]
    batch.tensors["advantages"] = sign * mask
    return trainer.update(batch, mini_batch_rows=8, temperature=1.0, global_step=1)


def test_update_metrics_of_one_sided_micro_batches(model_path):
    glob, ref = _update(model_path, "global"), _update(model_path, "reference")
    for key in ("pos_is_min", "pos_is_median", "pos_is_max", "neg_is_p75", "neg_is_max"):
        assert glob[f"actor/{key}"] > 0.5, key  # ratios near 1, not a 0.0 stand-in
        # reference: verl's 0.0 from the other micro-batch, in a plain mean of two
        assert ref[f"actor/{key}"] == pytest.approx(glob[f"actor/{key}"] / 2, rel=1e-6), key
