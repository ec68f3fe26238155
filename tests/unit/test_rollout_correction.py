"""Rollout correction (issue 11 item 4): weights and metrics against hand-computed values,
the loss multiplied by the weights, the driver stage, the schema and the config section."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fipo_trainer.algorithms.policy_loss import (
    PolicyLossConfig,
    compute_policy_loss,
    compute_policy_terms,
)
from fipo_trainer.algorithms.rollout_correction import (
    compute_rollout_correction_weights,
    parse_threshold,
    rollout_mismatch_metrics,
)
from fipo_trainer.cli import compose_config
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.schema import (
    ACTOR_UPDATE_OPTIONAL_READS,
    FIELDS,
    check_stage_output,
)
from fipo_trainer.trainer.config import ConfigError, load_config, validate_config
from fipo_trainer.trainer.rollout_correction import rollout_correction

LN2, LN3 = math.log(2.0), math.log(3.0)
# One row: ratios 1, 3, 1/2 on the response, a padding token with a huge log ratio.
LOG_RATIO = torch.tensor([[0.0, LN3, -LN2, 5.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


def close(a: torch.Tensor, b) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-6)


# --------------------------------------------------------------------------- weights


def test_token_level_truncated_is():
    w, m = compute_rollout_correction_weights(LOG_RATIO, MASK, "token", 2.0)
    assert close(w, [[1.0, 2.0, 0.5, 0.0]])
    assert m["rollout_corr/ratio_max"] == pytest.approx(3.0)
    assert m["rollout_corr/clipped_frac"] == pytest.approx(1 / 3)
    assert m["rollout_corr/ess"] == pytest.approx(3.5**2 / (3 * (1 + 4 + 0.25)))
    assert m["rollout_corr/kl_k1"] == pytest.approx((0 - LN3 + LN2) / 3)
    k3 = (0.0 + (3 - LN3 - 1) + (0.5 + LN2 - 1)) / 3
    assert m["rollout_corr/kl_k3"] == pytest.approx(k3)
    assert not w.requires_grad


@pytest.mark.parametrize("threshold", ["0.6_2.0", (0.6, 2.0), [0.6, 2.0]])
def test_icepop_zeroes_weights_outside_the_bounds(threshold):
    w, m = compute_rollout_correction_weights(LOG_RATIO, MASK, "token", threshold)
    assert close(w, [[1.0, 0.0, 0.0, 0.0]])
    assert m["rollout_corr/clipped_frac"] == pytest.approx(2 / 3)
    assert m["rollout_corr/ess"] == pytest.approx(1 / 3)
    assert m["rollout_corr/ratio_max"] == pytest.approx(3.0)


def test_icepop_bounds_are_inclusive():
    w, m = compute_rollout_correction_weights(LOG_RATIO, MASK, "token", "0.5_3.0")
    assert close(w, [[1.0, 3.0, 0.5, 0.0]])
    assert m["rollout_corr/clipped_frac"] == 0.0


def test_sequence_level_is_the_masked_sum_broadcast_and_all_padding_rows_are_zero():
    log_ratio = torch.tensor([[LN2, LN3, 7.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    w, m = compute_rollout_correction_weights(log_ratio, mask, "sequence", 10.0)
    assert close(w, [[6.0, 6.0, 0.0], [0.0, 0.0, 0.0]])
    assert m["rollout_corr/ratio_max"] == pytest.approx(6.0)
    assert m["rollout_corr/ess"] == pytest.approx(1.0)
    w, m = compute_rollout_correction_weights(log_ratio, mask, "sequence", 4.0)
    assert close(w, [[4.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    assert m["rollout_corr/clipped_frac"] == pytest.approx(1.0)
    w, _ = compute_rollout_correction_weights(log_ratio, mask, "sequence", "0.5_5.0")
    assert close(w, torch.zeros(2, 3))


def test_log_ratio_is_clamped_to_20_before_exp():
    big = 1e12
    w, m = compute_rollout_correction_weights(
        torch.tensor([[30.0, -30.0, 0.0]]), torch.ones(1, 3), "token", big
    )
    assert torch.allclose(w, torch.tensor([[math.exp(20), math.exp(-20), 1.0]]), rtol=1e-5)
    assert m["rollout_corr/ratio_max"] == pytest.approx(math.exp(20), rel=1e-5)
    w, _ = compute_rollout_correction_weights(
        torch.tensor([[15.0, 15.0], [-15.0, -15.0]]), torch.ones(2, 2), "sequence", big
    )
    assert torch.allclose(w[0], torch.full((2,), math.exp(20)), rtol=1e-5)
    assert torch.allclose(w[1], torch.full((2,), math.exp(-20)), rtol=1e-5)


def test_padding_is_zero_even_with_non_finite_log_ratios():
    log_ratio = torch.tensor([[0.1, float("inf"), float("nan")]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    for level in ("token", "sequence"):
        w, m = compute_rollout_correction_weights(log_ratio, mask, level, 2.0)
        assert close(w, [[math.exp(0.1), 0.0, 0.0]])
        assert all(math.isfinite(v) for v in m.values())


def test_all_padding_batch_metrics():
    w, m = compute_rollout_correction_weights(torch.randn(2, 3), torch.zeros(2, 3))
    assert close(w, torch.zeros(2, 3))
    assert m == {
        "rollout_corr/kl_k1": 0.0,
        "rollout_corr/kl_k3": 0.0,
        "rollout_corr/clipped_frac": 0.0,
        "rollout_corr/ratio_max": 1.0,
        "rollout_corr/ess": 1.0,
    }


def test_mismatch_metrics_subtract_rollout_from_old():
    old = torch.tensor([[-1.0, -2.0]])
    rollout = torch.tensor([[-1.0 - LN2, -2.0]])  # old / rollout = 2, 1
    m = rollout_mismatch_metrics(old, rollout, torch.ones(1, 2), threshold=1.5)
    assert m["rollout_corr/ratio_max"] == pytest.approx(2.0)
    assert m["rollout_corr/kl_k1"] == pytest.approx(-LN2 / 2)
    assert m["rollout_corr/clipped_frac"] == pytest.approx(0.5)
    same = rollout_mismatch_metrics(old, old, torch.ones(1, 2))
    assert same["rollout_corr/kl_k1"] == 0.0 and same["rollout_corr/kl_k3"] == 0.0
    assert same["rollout_corr/ess"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "threshold,match",
    [(0.0, ">= 1"), (0.52, ">= 1"), ("2_1", "lower < upper"), ("1.5_2", "lower <= 1"),
     ("0.2_0.8", "1 <= upper"), ("a_b", "lower_upper"), ("1_2_3", "lower_upper"),
     ([1.0], "2 values"), (True, "number")],
)
def test_bad_thresholds_are_refused(threshold, match):
    with pytest.raises(ValueError, match=match):
        parse_threshold(threshold)


def test_threshold_forms():
    assert parse_threshold(2) == (None, 2.0)
    assert parse_threshold("2.5") == (None, 2.5)
    assert parse_threshold("0.5_2.0") == (0.5, 2.0)
    with pytest.raises(ValueError, match="level"):
        compute_rollout_correction_weights(LOG_RATIO, MASK, "word")


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("name", ["vanilla", "fipo"])
def test_weights_multiply_the_per_token_loss_of_any_loss(name):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g)
    logp = (old + 0.3 * torch.randn(3, 5, generator=g)).requires_grad_()
    adv = torch.tensor([[1.0], [-1.0], [0.5]]).expand(3, 5)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0]])
    w = torch.rand(3, 5, generator=g) * 2 * mask
    cfg = PolicyLossConfig()
    plain = compute_policy_terms(name, old, logp, adv, mask, cfg)
    weighted = compute_policy_terms(name, old, logp, adv, mask, cfg, is_weights=w)
    assert torch.equal(weighted.loss_mat, plain.loss_mat * w)
    assert torch.equal(weighted.loss_mask, plain.loss_mask)
    loss, _ = compute_policy_loss(name, old, logp, adv, mask, cfg, is_weights=w)
    lm = plain.loss_mask
    assert float(loss.detach()) == pytest.approx(float((plain.loss_mat.detach() * w * lm).sum() / lm.sum()))
    ones = compute_policy_terms(name, old, logp, adv, mask, cfg, is_weights=torch.ones(3, 5))
    assert torch.equal(ones.loss_mat, plain.loss_mat)
    with pytest.raises(ValueError, match="is_weights shape"):
        compute_policy_terms(name, old, logp, adv, mask, cfg, is_weights=torch.ones(3, 4))


def test_policy_trainer_update_applies_the_batch_weights():
    from tests.unit.test_policy_trainer import (
        ROWS,
        AutoModelForCausalLM,
        build_tiny_model,
        make_config,
        make_trainer,
        max_abs_diff,
        off_policy_batch,
        padded_log_probs,
    )

    model_path = build_tiny_model()
    cfg = make_config(model_path, loss_scale="global", ppo_max_token_len_per_gpu=30)
    trainer = make_trainer(cfg)
    batch = off_policy_batch(trainer)
    g = torch.Generator().manual_seed(5)
    w = torch.rand(batch["response_mask"].shape, generator=g) * 2 * batch["response_mask"]
    batch.tensors["rollout_is_weights"] = w
    trainer.update(batch, mini_batch_rows=ROWS, temperature=1.0, global_step=1)
    (grads,) = trainer.engine.last_grads
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    logp, _ = padded_log_probs(model, batch)
    loss, _ = compute_policy_loss(
        "fipo", batch["old_log_probs"], logp, batch["advantages"], batch["response_mask"],
        cfg.policy_loss, is_weights=w,
    )
    loss.backward()
    assert max_abs_diff(grads, {n: p.grad for n, p in model.named_parameters()}) <= 1e-6


# --------------------------------------------------------------------------- stage / schema


def _batch() -> Batch:
    old = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -0.5, -0.5]])
    rollout = old - torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return Batch({"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask})


def _algo(**rc) -> SimpleNamespace:
    base = {"enable": False, "level": "token", "threshold": 2.0}
    return SimpleNamespace(rollout_correction=SimpleNamespace(**{**base, **rc}))


def test_stage_off_logs_metrics_and_adds_no_field():
    batch, metrics = rollout_correction(_batch(), {"x": 1.0}, _algo())
    assert "rollout_is_weights" not in batch
    assert metrics["x"] == 1.0
    assert metrics["rollout_corr/ratio_max"] == pytest.approx(3.0)
    assert metrics["rollout_corr/clipped_frac"] == pytest.approx(1 / 5)


def test_stage_on_adds_exactly_its_field():
    batch, _ = rollout_correction(_batch(), {}, _algo(enable=True))
    assert close(batch["rollout_is_weights"], [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    check_stage_output("rollout_correction", ["rollout_is_weights"])
    assert FIELDS["rollout_is_weights"].producer == "rollout_correction"
    assert "rollout_is_weights" in ACTOR_UPDATE_OPTIONAL_READS
    assert "actor" in FIELDS["rollout_is_weights"].readers


# --------------------------------------------------------------------------- config


def _quick(*overrides: str):
    return load_config(compose_config(list(overrides)), build_model=False)


def _errors(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(_quick(*overrides), check_files=False, check_platform=False)
    return str(info.value)


def test_config_is_off_by_default_in_every_algorithm():
    for algo in ("fipo", "dapo", "grpo"):
        rc = _quick(f"algorithm={algo}").algorithm.rollout_correction
        assert (rc.enable, rc.level, rc.threshold, rc.bypass_mode) == (False, "token", 2.0, False)


def test_config_accepts_both_threshold_forms():
    for value in ("3.0", "0.5_2.0", "[0.5,2.0]"):
        cfg = _quick("algorithm.rollout_correction.enable=true",
                     f"algorithm.rollout_correction.threshold={value}")
        cfg.algorithm.validate()


@pytest.mark.parametrize(
    "override,match",
    [
        ("level=word", r"algorithm\.rollout_correction\.level must be one of"),
        ("threshold=0", r"algorithm\.rollout_correction\.threshold .*must be >= 1"),
        # Hydra reads an unquoted 0.5_2 as the number 0.52 (digit separator): refused
        ("threshold=0.5_2", r"algorithm\.rollout_correction\.threshold .*\[0\.5,2\.0\]"),
        ("threshold=[2.0,1.0]", r"algorithm\.rollout_correction\.threshold .*lower < upper"),
        ("threshold=x", r"algorithm\.rollout_correction\.threshold .*lower_upper"),
    ],
)
def test_config_errors_name_the_key(override, match):
    assert __import__("re").search(match, _errors(f"algorithm.rollout_correction.{override}"))


def test_bypass_mode_validates_on_policy_untruncated_and_uncorrected():
    bypass = "algorithm.rollout_correction.bypass_mode=true"
    validate_config(_quick(bypass), check_files=False, check_platform=False)
    errors = _errors(bypass, "algorithm.rollout_correction.enable=true")
    assert "bypass_mode=true with algorithm.rollout_correction.enable=true" in errors
    errors = _errors(bypass, "trainer.async_mode=one_step")
    assert "bypass_mode=true with trainer.async_mode=one_step" in errors
    assert "trainer.async_mode=off" in errors
    errors = _errors(bypass, "rollout.top_p=0.9")
    assert "rollout.top_p=0.9" in errors and "rollout.top_p=1.0" in errors
    assert "rollout.top_k=20" in _errors(bypass, "rollout.top_k=20")
    # validation sampling (rollout.val.top_p) trains nothing: allowed
    validate_config(_quick(bypass, "rollout.val.top_p=0.7"), check_files=False,
                    check_platform=False)
