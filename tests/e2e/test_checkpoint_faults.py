"""A damaged newest checkpoint: ``trainer.resume=auto`` notices it before Ray starts and
resumes from the older valid one (real components, as in ``test_train.py``)."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.checkpoint import STATE_FILE
from fipo_trainer.trainer.config import prepare_config
from fipo_trainer.trainer.loop import run_training
from fipo_trainer.trainer.tracking import read_metrics
from tests.helpers.layouts import TWO_RANKS

pytestmark = pytest.mark.e2e

COMMON = [
    *TWO_RANKS,  # a checkpoint of several ranks' shards
    "trainer.test_freq=0",
    "trainer.val_before_train=false",
    "trainer.save_freq=1",
    "trainer.max_ckpt_to_keep=2",
    "trainer.plot=false",
    "trainer.export_hf=false",
    "trainer.rollout_dump_freq=0",
    "trainer.loggers=[console,jsonl]",
]


def train(run_dir, *overrides):
    cfg = prepare_config(compose_config([*COMMON, f"trainer.run_dir={run_dir}", *overrides]))
    return run_training(cfg)


def test_truncated_newest_state_falls_back_to_older_step_before_ray_starts(
    tmp_path, caplog, monkeypatch
):
    import fipo_trainer.cluster.ray_init as ray_init

    run_dir = tmp_path / "run"
    first = train(run_dir, "trainer.total_training_steps=2", "trainer.resume=disable")
    assert first.steps == 2
    ckpts = run_dir / "checkpoints"
    state = ckpts / "global_step_2" / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])  # what a full disk or a bad copy leaves
    (ckpts / ".tmp-global_step_3-deadbeef" / "actor").mkdir(parents=True)  # a crash mid-save

    ray_started: list[tuple[float, int]] = []
    real_init = ray_init.init_ray

    def recording_init(*args, **kwargs):
        ray_started.append((time.monotonic(), len(caplog.records)))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray_init, "init_ray", recording_init)
    caplog.set_level(logging.INFO, logger="fipo_trainer")
    start = time.monotonic()
    resumed = train(run_dir, "trainer.total_training_steps=2", "trainer.resume=auto")

    assert resumed.steps == 2  # resumed at step 1, trained step 2 again
    messages = [r.getMessage() for r in caplog.records]
    broken = [
        i
        for i, m in enumerate(messages)
        if "global_step_2 is broken" in m and f"{STATE_FILE} has 100 bytes" in m
    ]
    resumed_at = [i for i, m in enumerate(messages) if "resumed from" in m and "step 1" in m]
    cleaned = [i for i, m in enumerate(messages) if "leftover temporary checkpoint" in m]
    assert broken and resumed_at and cleaned, messages
    # the manifest check (and the clean-up) happened before Ray was even asked to start
    (ray_time, records_before_ray) = ray_started[0]
    assert cleaned[0] < broken[0] < records_before_ray <= resumed_at[0]
    assert ray_time - start < 30
    assert not (ckpts / ".tmp-global_step_3-deadbeef").exists()
    # the re-trained step 2 replaced the broken checkpoint with a valid one
    from fipo_trainer.trainer.checkpoint import CheckpointManager

    assert CheckpointManager(run_dir).resolve_resume("auto") == ckpts / "global_step_2"


def test_a_fresh_start_in_a_used_run_directory_keeps_the_earlier_run(tmp_path):
    """``trainer.resume=disable`` (the CPU quickstart's) run again in its run directory used
    to truncate the first run's metrics.jsonl and, saving its own step 1 under
    ``max_ckpt_to_keep``, replace and prune the first run's checkpoints."""
    from fipo_trainer.trainer.checkpoint import CheckpointManager
    from fipo_trainer.trainer.checkpoint_manifest import checkpoint_problems

    run_dir = tmp_path / "run"
    train(run_dir, "trainer.total_training_steps=2", "trainer.resume=disable")
    again = train(run_dir, "trainer.total_training_steps=1", "trainer.resume=disable")
    assert again.steps == 1
    (earlier,) = (run_dir / "earlier_runs").iterdir()
    assert [r["step"] for r in read_metrics(earlier / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]
    first = CheckpointManager(earlier)
    assert [p.name for p in first.checkpoints()] == ["global_step_1", "global_step_2"]
    assert all(not checkpoint_problems(p) for p in first.checkpoints())
    assert [p.name for p in CheckpointManager(run_dir).checkpoints()] == ["global_step_1"]


def test_resuming_a_finished_run_starts_nothing(tmp_path, monkeypatch):
    """The same command run again after the run ended (``trainer.resume=auto``) used to
    start Ray, the ranks and the engines, train nothing and export the model again."""
    import fipo_trainer.cluster.ray_init as ray_init

    run_dir = tmp_path / "run"
    # an epoch of 2 steps (32 prompts, 16 a step): the end comes from the row count
    epoch = ["trainer.total_training_steps=null", "data.synthetic.num_train=32"]
    first = train(run_dir, *epoch, "trainer.resume=disable", "trainer.export_hf=true")
    assert first.steps == 2
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    export = (run_dir / "hf_model").stat().st_mtime_ns

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a finished run")

    monkeypatch.setattr(ray_init, "init_ray", no_ray)
    again = train(run_dir, *epoch, "trainer.resume=auto", "trainer.export_hf=true")
    assert again.steps == 2 and again.checkpoint == run_dir / "checkpoints" / "global_step_2"
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert (run_dir / "hf_model").stat().st_mtime_ns == export
    assert not (run_dir / "earlier_runs").exists()
    # Stopped during its export (the full-weights gather), the finished run used to say
    # "nothing to train" for good: now it starts the roles again only to export.
    monkeypatch.undo()
    shutil.rmtree(run_dir / "hf_model")
    exported = train(run_dir, *epoch, "trainer.resume=auto", "trainer.export_hf=true")
    assert exported.steps == 2 and exported.export_dir == (run_dir / "hf_model").resolve()
    assert (run_dir / "hf_model" / "config.json").is_file()
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing trained again
    assert not (run_dir / "checkpoints" / "global_step_3").exists()


def test_a_row_lost_between_a_save_and_its_log_is_written_from_the_checkpoint(tmp_path):
    """A step's row is logged after its checkpoint is saved: a run stopped in between used
    to resume after that step with its row missing for good (curves, fipo-plot, trackers)."""
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.total_training_steps=2", "trainer.resume=disable")
    path = run_dir / "metrics.jsonl"
    logged = read_metrics(path)

    def stopped_before_logging(step: int) -> None:
        rows = [r for r in read_metrics(path) if r["step"] < step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    stopped_before_logging(2)
    assert train(run_dir, "trainer.total_training_steps=3", "trainer.resume=auto").steps == 3
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1] == {k: v for k, v in logged[1].items() if k != "timing_s/save"}
    # The same for a run whose last step it was: nothing to train, the row still written.
    stopped_before_logging(3)
    assert train(run_dir, "trainer.total_training_steps=3", "trainer.resume=auto").steps == 3
    unsaved = {k: v for k, v in rows[2].items() if k != "timing_s/save"}
    assert read_metrics(path) == [*rows[:2], unsaved]
