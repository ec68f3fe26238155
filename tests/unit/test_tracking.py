"""Tracker: jsonl contents and resume, console with and without a terminal, tensorboard, errors."""

from __future__ import annotations

import io
import json
import math
import sys
import time

import numpy as np
import pytest
import torch
from rich.console import Console

from fipo_trainer.trainer.tracking import (
    METRICS_FILE,
    Tracker,
    read_metrics,
    restore_checkpoint_row,
)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tracker(tmp_path, backends=("jsonl",), start_step=0, console=None, total=5):
    return Tracker(list(backends), tmp_path, "proj", "exp", {"lr": 1e-6}, total, start_step, console=console)


def test_jsonl_one_object_per_step_flushed_and_non_finite_as_null(tmp_path):
    t = _tracker(tmp_path)
    t.log({"reward/score_mean": 0.5, "actor/ppo_kl": float("nan"), "x": float("inf")}, step=1)
    # readable before close: flushed every step
    assert _lines(tmp_path / METRICS_FILE) == [
        {"step": 1, "reward/score_mean": 0.5, "actor/ppo_kl": None, "x": None}
    ]
    t.log({"n": np.float32(2.0), "t": torch.tensor(3.0), "b": True, "s": "text"}, step=2)
    t.close()
    rows = _lines(tmp_path / METRICS_FILE)
    assert rows[1] == {"step": 2, "n": 2.0, "t": 3.0, "b": 1.0}  # the string is dropped
    with pytest.raises(RuntimeError, match="after close"):
        t.log({"a": 1.0}, step=3)


def test_resume_drops_steps_after_the_checkpoint_and_appends(tmp_path):
    with _tracker(tmp_path) as t:
        for step in range(0, 6):
            t.log({"v": float(step)}, step=step)
    # a crash mid-write leaves a torn last line
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "v"')
    with _tracker(tmp_path, start_step=3) as t:
        for step in (4, 5, 6):
            t.log({"v": 10.0 * step}, step=step)
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["v"] for r in rows] == [0, 1, 2, 3, 40, 50, 60]
    # a fresh run (start_step 0) starts a new file
    with _tracker(tmp_path) as t:
        t.log({"v": -1.0}, step=1)
    assert _lines(tmp_path / METRICS_FILE) == [{"step": 1, "v": -1.0}]


def test_a_checkpoints_row_is_written_only_where_the_file_stops_before_its_step(tmp_path):
    """A run stopped between step 2's save and its row: the checkpoint's copy is written
    (non-finite values as null, like a logged row); a file that has the row (or a later
    one), no file (another run's checkpoint), or no row in the checkpoint: nothing."""
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0')  # a torn last write
    row = {"a": 2.5, "b": float("nan")}
    assert restore_checkpoint_row(tmp_path, 2, row)
    assert read_metrics(path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.5, "b": None}]
    before = path.read_bytes()
    assert not restore_checkpoint_row(tmp_path, 2, {"a": 9.0})  # has it now
    assert not restore_checkpoint_row(tmp_path, 1, {"a": 9.0})  # has later rows
    assert not restore_checkpoint_row(tmp_path, 3, None)  # an older checkpoint has none
    assert path.read_bytes() == before
    path.write_text('{"step": 1, "a": 1.0}\n')  # values the tracker would have cleaned
    assert restore_checkpoint_row(tmp_path, 2, {"a": np.float32(0.5), "s": "text"})
    assert read_metrics(path)[-1] == {"step": 2, "a": 0.5}
    assert not restore_checkpoint_row(tmp_path / "fresh", 2, row)
    assert not (tmp_path / "fresh" / METRICS_FILE).exists()


def test_console_without_terminal_prints_plain_lines(tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=60)
    with _tracker(tmp_path, ("console",), console=console) as t:
        for step in (1, 2):
            t.log({"reward/score_mean": 0.25 * step, "val/mean@4": 0.5, "val/a/mean@4": 0.1, "actor/entropy": 1.5}, step)
    out = buf.getvalue()
    assert "\x1b[" not in out  # no escape codes in logs
    lines = [line for line in out.splitlines() if "step " in line]
    assert len(lines) == 2, out
    assert "step 2/5" in lines[1] and "score=0.5" in lines[1] and "mean@4=0.5" in lines[1]
    assert "ent=1.5" in lines[1] and "eta" in lines[0]
    assert (tmp_path / METRICS_FILE).exists()  # jsonl is always on


def test_console_with_terminal_shows_a_progress_bar(tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with _tracker(tmp_path, ("console",), start_step=2, console=console, total=4) as t:
        t.log({"reward/acc_mean": 0.75}, step=3)
        t.log({"reward/acc_mean": 1.0}, step=4)
    out = buf.getvalue()
    assert "resumed at step 2" in out and "acc=0.75" in out and "4/4" in out


def _next_second():
    """Event files sort by their name, which starts with the creation second: keep writers apart."""
    time.sleep(1.01 - time.time() % 1)


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with _tracker(tmp_path, ("tensorboard",)) as t:
        for step in range(1, 6):
            t.log({"reward/score_mean": float(step), "nan": math.nan}, step)
    _next_second()
    with _tracker(tmp_path, ("tensorboard",), start_step=3) as t:
        t.log({"reward/score_mean": 40.0}, 4)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward/score_mean")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert acc.Tags()["tensors"] == ["config/text_summary"]  # written once, by the fresh run
    # a fresh run in the same directory hides the earlier run's curves
    _next_second()
    with _tracker(tmp_path, ("tensorboard",)) as t:
        t.log({"reward/score_mean": -1.0}, 1)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/score_mean")] == [(1, -1.0)]


def test_bad_logger_names_and_missing_optional_packages(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"trainer\.loggers"):
        _tracker(tmp_path, ("jsonl", "mlflow"))
    for name in ("wandb", "swanlab"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
        with pytest.raises(ImportError, match=r"pip install fipo-trainer\[loggers\]"):
            _tracker(tmp_path, ("console", name))


class _FakeService:
    """Records what the tracker asks of a wandb/swanlab module and of its run."""

    def __init__(self):
        self.calls = []
        self.run = self

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self.run

    def log(self, metrics, step):
        self.calls.append(("log", dict(metrics), step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("service", ["wandb", "swanlab"])
def test_hosted_backends_name_the_run_and_continue_it_on_resume(tmp_path, monkeypatch, service):
    fake = _FakeService()
    monkeypatch.setitem(sys.modules, service, fake)
    with _tracker(tmp_path, (service,)) as t:
        t.log({"a": 1.0, "b": float("nan")}, 1)
    init = fake.calls[0][1]
    assert init["project"] == "proj" and init["config"] == {"lr": 1e-6} and init["resume"] == "allow"
    if service == "wandb":
        assert (init["name"], init["dir"]) == ("exp", str(tmp_path))
        assert fake.calls[1][1]["a"] == 1.0 and math.isnan(fake.calls[1][1]["b"])
    else:  # swanlab gets no NaN/inf
        assert (init["experiment_name"], init["logdir"]) == ("exp", str(tmp_path / "swanlab"))
        assert fake.calls[1] == ("log", {"a": 1.0}, 1)
    assert fake.calls[-1] == ("finish",)
    with _tracker(tmp_path, (service,), start_step=1):
        pass
    assert fake.calls[3][1]["id"] == init["id"]  # resumed: the same run
    with _tracker(tmp_path, (service,)):
        pass
    assert fake.calls[5][1]["id"] != init["id"]  # a fresh run: a new one
