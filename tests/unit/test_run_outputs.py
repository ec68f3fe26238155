"""``run_outputs``: a run that starts afresh in a used run directory sets the earlier run's
outputs aside instead of truncating its metrics and deleting its checkpoints."""

from __future__ import annotations

import logging

from fipo_trainer.trainer import run_outputs
from fipo_trainer.trainer.run_outputs import RUN_OUTPUTS, set_aside_earlier_run


def test_the_list_names_what_the_modules_write():
    from fipo_trainer.trainer import (
        checkpoint,
        plot,
        timeline,
        token_plot,
        tracking,
        tracking_backends,
    )

    for name in (
        tracking.METRICS_FILE,
        checkpoint.CHECKPOINTS_DIR,
        plot.DEFAULT_PNG,
        token_plot.POSITIONS_PNG,
        tracking_backends.RUN_ID_FILE,
        timeline.TIMELINE_FILE,
        timeline.TIMELINE_PNG,
    ):
        assert name in RUN_OUTPUTS


def test_a_directory_without_an_earlier_run_is_left_as_it_is(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "curves.png").write_bytes(b"png")  # a plot alone is not a run
    assert set_aside_earlier_run(tmp_path, "disable") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "curves.png"]
    assert set_aside_earlier_run(tmp_path / "new", "auto") is None


def test_an_earlier_runs_outputs_move_whole_and_this_runs_files_stay(tmp_path, caplog):
    for name in ("checkpoints/global_step_4/actor", "rollouts", "tensorboard", "data"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoints/global_step_4/trainer_state.pt").write_bytes(b"state")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    for name in ("curves.png", "fipo-train.log", ".fipo-train.lock", "my_notes.txt"):
        (tmp_path / name).write_text(name)
    with caplog.at_level(logging.WARNING, logger=run_outputs.__name__):
        target = set_aside_earlier_run(tmp_path, "disable")
    assert target is not None and target.parent == tmp_path / "earlier_runs"
    assert sorted(p.name for p in target.iterdir()) == [
        "checkpoints", "curves.png", "metrics.jsonl", "rollouts", "tensorboard"
    ]
    assert (target / "checkpoints/global_step_4/trainer_state.pt").read_bytes() == b"state"
    # the new run's own (Hydra's record and log, its data, the lock) and the user's stay
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".fipo-train.lock", "data", "earlier_runs", "fipo-train.log", "my_notes.txt"]
    assert "trainer.resume=disable starts afresh" in caplog.text and str(target) in caplog.text


def test_two_fresh_starts_within_a_second_get_two_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(run_outputs, "_now_stamp", lambda: "2026-12-06_05-00-00")
    (tmp_path / "metrics.jsonl").write_text("first\n")
    first = set_aside_earlier_run(tmp_path, "auto")
    (tmp_path / "metrics.jsonl").write_text("second\n")
    second = set_aside_earlier_run(tmp_path, "auto")
    assert first is not None and second is not None and first != second
    assert (first / "metrics.jsonl").read_text() == "first\n"
    assert (second / "metrics.jsonl").read_text() == "second\n"
