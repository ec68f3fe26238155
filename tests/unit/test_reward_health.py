"""Reward fault tolerance with real grader processes: custom modules load only in the
graders, out-of-range scores and runaway memory fail their item, and a grader that keeps
failing stops the run (through `Sampler.collect`) with a message naming it."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fipo_trainer.data.batch import Batch, to_object_array
from fipo_trainer.rewards import RewardConfig, RewardPool
from fipo_trainer.rewards.result import GradeItems
from fipo_trainer.rollout.config import SamplingConfig
from fipo_trainer.trainer.sampling import Sampler, TrainingStopped

pytestmark = pytest.mark.timeout(120)

REWARD_SOURCE = """
import os
import sys

with open(os.environ["MARKER_FILE"], "a") as f:  # top-level code: who imports this module?
    f.write(f"{os.getpid()}\\n")


def score(response, ground_truth):
    if response == "huge":
        return 1e39  # finite in float64, inf in float32
    if response == "big":
        return 5e4
    if response == "alloc":
        return len(b"x" * (2 * 1024**3))  # 2 GiB
    if response == "die":
        os._exit(7)
    if response == "raise":
        raise ValueError("grader bug")
    return 1.0 if response == ground_truth else 0.0
"""


@pytest.fixture
def reward_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_SOURCE)
    monkeypatch.setenv("MARKER_FILE", str(tmp_path / "imported_by.txt"))
    return path


def make_pool(reward_file: Path, **kwargs) -> RewardPool:
    settings = {"num_workers": 1, "timeout_s": 20.0, "score_format": "binary", **kwargs}
    cfg = RewardConfig(custom_function=f"{reward_file}:score", **settings)
    return RewardPool(cfg)


def test_custom_module_is_imported_in_the_grader_processes_only(reward_file: Path) -> None:
    with make_pool(reward_file) as pool:
        assert pool.grade(["1"], ["1"], ["s"]).scores == [1.0]
        workers = set(pool.worker_pids)
    pids = {int(p) for p in (reward_file.parent / "imported_by.txt").read_text().split()}
    assert os.getpid() not in pids
    assert pids & workers


def test_missing_custom_file_still_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"reward\.custom_function.*missing\.py"):
        RewardPool(RewardConfig(custom_function=f"{tmp_path}/missing.py:score"))


def test_scores_are_checked_in_float32_and_against_the_bound(reward_file: Path) -> None:
    with make_pool(reward_file) as pool:
        result = pool.grade(["huge", "big", "1"], ["1", "1", "1"], ["src_a", "src_b", "src_c"])
    assert result.status == ["error", "error", "ok"]
    assert result.scores == [0.0, 0.0, 1.0]  # the failure score, like a non-finite one
    assert result.metrics["reward/errors"] == 2
    huge, big = result.errors[0], result.errors[1]
    assert f"custom function {reward_file}:score" in huge
    assert "sample 0" in huge and "'src_a'" in huge and "'huge'" in huge
    assert "not finite in float32" in huge
    assert "reward.max_abs_score=10000" in big and "'src_b'" in big
    assert result.failures == {f"custom function {reward_file}:score": {"timeout": 0, "error": 2}}

    with make_pool(reward_file, max_abs_score=None) as pool:
        result = pool.grade(["huge", "big"], ["1", "1"], ["s", "s"])
    assert result.status == ["error", "ok"] and result.scores == [0.0, 5e4]


def test_grade_stream_reports_each_final_verdict_once_as_it_comes(reward_file: Path) -> None:
    """Dynamic sampling settles a batch on these verdicts before the last one arrives
    (trainer/sampling.py), so a verdict reported is the result's: a score the check fails
    is reported as failed (acc False), never first as the grader's acc."""
    seen: dict[int, bool] = {}
    calls: list[list[int]] = []

    def progress(indices: list[int], acc) -> None:
        calls.append(indices)
        for i in indices:
            assert i not in seen, f"item {i} reported twice"
            seen[i] = acc[i]

    parts = [GradeItems([2], ["huge"], ["1"], ["s"]), None,  # None: no new part yet
             GradeItems([0, 1, 3], ["1", "0", "raise"], ["1"] * 3, ["s"] * 3)]  # fmt: skip
    with make_pool(reward_file) as pool:
        result = pool.grade_stream(parts, 4, on_progress=progress)
    assert result.status == ["ok", "ok", "error", "error"]
    assert seen == {0: True, 1: False, 2: False, 3: False} == dict(enumerate(result.acc))
    assert sorted(i for c in calls for i in c) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_abs_score": 0.0}, "reward.max_abs_score"),
        ({"max_abs_score": 1e39}, "reward.max_abs_score"),
        ({"max_memory_mb": 10}, "reward.max_memory_mb"),
    ],
)
def test_new_reward_keys_are_validated(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        RewardConfig(**kwargs)


def test_memory_limit_turns_a_runaway_grader_into_a_failed_item(reward_file: Path) -> None:
    with make_pool(reward_file, max_memory_mb=300) as pool:
        result = pool.grade(["alloc", "1"], ["1", "1"], ["s", "s"])
    assert result.status == ["error", "ok"] and result.scores == [0.0, 1.0]
    assert "MemoryError" in result.errors[0]
    assert "reward.max_memory_mb=300" in result.errors[0]


def test_memory_limit_below_the_start_up_size_is_a_start_up_error(reward_file: Path) -> None:
    with (
        make_pool(reward_file, max_memory_mb=64) as pool,
        pytest.raises(RuntimeError, match=r"reward\.max_memory_mb=64 is below"),
    ):
        pool.grade(["1"], ["1"], ["s"])


# ---------------------------------------------------------------- through Sampler.collect
class Prompts:
    dataset = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0))

    def next_batch(self, size: int, uid_prefix: str) -> Batch:
        return Batch(non_tensors={"uid": [f"{uid_prefix}-{i}" for i in range(size)]})


class Rollout:
    """Responses for each round from a list (the engine is not what is under test)."""

    def __init__(self, n: int, rounds: list[list[str]]) -> None:
        self.n, self.rounds = n, list(rounds)

    def generate_stream(self, prompts: Batch, sampling: SamplingConfig, ticks=None):
        """One part holding every response (what RolloutGroup.generate_stream yields)."""
        texts = self.rounds.pop(0)
        rows = len(texts)
        mask = torch.ones(rows, 2)
        batch = Batch(
            {
                "responses": torch.ones(rows, 2, dtype=torch.long),
                "input_ids": torch.ones(rows, 4, dtype=torch.long),
                "attention_mask": torch.ones(rows, 4, dtype=torch.long),
                "response_mask": mask,
                "rollout_log_probs": -mask,
            },
            {
                "uid": to_object_array([u for u in prompts["uid"] for _ in range(self.n)]),
                "response_text": texts,
                "ground_truth": ["1"] * rows,
                "data_source": ["arith"] * rows,
            },
        )
        metrics = {"rollout/seconds": 1.0, "rollout/responses": float(rows),
                   "rollout/response_tokens": 2.0 * rows}  # fmt: skip
        yield np.arange(rows), batch, metrics


def sampler_cfg(max_frac: float = 0.5, max_steps: int = 3) -> SimpleNamespace:
    return SimpleNamespace(
        algorithm=SimpleNamespace(
            filter_groups=SimpleNamespace(
                enable=False, metric="acc", max_num_gen_batches=3, on_exhausted="proceed"
            )
        ),
        rollout=SimpleNamespace(n=2, sampling=lambda: SamplingConfig(n=2)),
        data=SimpleNamespace(train_batch_size=2, gen_batch_size=2, max_response_length=2),
        actor=SimpleNamespace(ppo_mini_batch_size=1),
        trainer=SimpleNamespace(
            seed=0, max_failed_reward_frac=max_frac, max_failed_reward_steps=max_steps
        ),
    )


def test_a_grader_failing_most_items_stops_the_run_naming_it(reward_file: Path) -> None:
    failing = ["raise", "raise", "raise", "1"]  # 3/4 >= 0.5
    rounds = [failing, failing, ["1"] * 4, failing, failing, failing]
    with make_pool(reward_file, num_workers=2) as pool:
        sampler = Sampler(sampler_cfg(), Prompts(), Rollout(2, rounds), pool)
        for step in (1, 2):
            _, metrics = sampler.collect(step)
            assert metrics["reward/errors"] == 3 and metrics["reward/failed_streak"] == step
            assert metrics["reward/failed_frac"] == 0.75
        _, metrics = sampler.collect(3)  # a healthy step resets the count
        assert metrics["reward/failed_streak"] == 0 and metrics["reward/failed_frac"] == 0
        sampler.collect(4)
        sampler.collect(5)
        with pytest.raises(TrainingStopped) as stopped:
            sampler.collect(6)
    message = str(stopped.value)
    assert f"custom function {reward_file}:score: 0 timeouts, 3 errors" in message
    assert "3/4 items failed (0 timeouts, 3 errors)" in message
    assert "3 rounds in a row" in message and "ValueError: grader bug" in message
    for key in ("trainer.max_failed_reward_frac=0.5", "trainer.max_failed_reward_steps=3"):
        assert key in message


def test_worker_restarts_reach_the_step_metrics(reward_file: Path) -> None:
    with make_pool(reward_file) as pool:
        rounds = [["die", "1", "1", "1"]]
        sampler = Sampler(sampler_cfg(), Prompts(), Rollout(2, rounds), pool)
        _, metrics = sampler.collect(1)
    assert metrics["reward/worker_restarts"] == 1
    assert metrics["reward/errors"] == 1 and metrics["reward/items"] == 4
