"""Resuming a run whose checkpoint is already its last step starts nothing: no Ray, no
DeepSpeed, no vLLM, no second HF export (on the paper's layout the roles alone take
minutes to start)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from fipo_trainer.trainer.loop import RLTrainer


def trainer(tmp_path: Path, steps: int | None, epochs: int = 1, batch: int = 16) -> RLTrainer:
    cfg = SimpleNamespace(
        trainer=SimpleNamespace(
            run_dir=str(tmp_path), total_training_steps=steps, total_epochs=epochs
        ),
        data=SimpleNamespace(train_batch_size=batch),
    )
    return RLTrainer(cfg)  # type: ignore[arg-type]


def resumed(t: RLTrainer, step: int, num_rows: int | None = 64) -> RLTrainer:
    sampler = {} if num_rows is None else {"num_rows": num_rows}
    t._resume = (t.run_dir / f"checkpoints/global_step_{step}", {"step": step, "sampler": sampler})
    return t


@pytest.mark.parametrize(
    "steps, epochs, step, finished",
    [
        (250, 1, 250, True),  # trainer.total_training_steps (every recipe)
        (250, 1, 249, False),
        (300, 1, 250, False),  # raised to go on
        (None, 2, 8, True),  # 64 rows / 16 = 4 steps an epoch, 2 epochs
        (None, 3, 8, False),
    ],
)
def test_a_run_resumed_at_its_last_step_is_finished(tmp_path, caplog, steps, epochs, step, finished):
    t = resumed(trainer(tmp_path, steps, epochs), step)
    with caplog.at_level(logging.WARNING):
        result = t._finished_already()
    assert (result is not None) is finished
    if finished:
        assert result.steps == step and result.checkpoint == t._resume[0]
        assert f"is the run's last step ({step}): nothing to train" in caplog.text
        key = "total_training_steps" if steps else "total_epochs"
        assert f"Raise trainer.{key} to go on" in caplog.text


def test_a_fresh_run_or_an_older_checkpoint_without_a_row_count_goes_ahead(tmp_path):
    assert trainer(tmp_path, 250)._finished_already() is None  # nothing to resume
    t = trainer(tmp_path, 250)
    t._resume = None
    assert t._finished_already() is None
    assert resumed(trainer(tmp_path, None), 4, num_rows=None)._finished_already() is None


def test_a_finished_run_stopped_during_its_export_is_not_finished(tmp_path, caplog):
    """Killed during the final HF export, re-running the command said "nothing to train"
    for good: no export, and no command but a retrain to get one."""
    t = resumed(trainer(tmp_path, 250), 250)
    t.cfg.trainer.export_hf = True
    t._resume[0].mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        assert t._finished_already() is None
    assert "hf_model is missing: starting the roles to export it" in caplog.text
    (tmp_path / "hf_model").mkdir()  # exported after the last checkpoint: finished
    assert t._finished_already() is not None
    t.cfg.trainer.export_hf = False  # no export asked for: finished without one
    (tmp_path / "hf_model").rmdir()
    assert t._finished_already() is not None
