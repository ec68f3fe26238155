"""CheckpointManager: atomic saves, latest pointer, keep-last-N, resume resolution, state round-trip."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from fipo_trainer.trainer.checkpoint import POINTER_FILE, STATE_FILE, CheckpointManager, step_of
from fipo_trainer.trainer.checkpoint_manifest import STATE_FORMAT, CheckpointInvalid


def _writer(payload: str = "weights"):
    def write(path):
        (path / "actor").mkdir()
        (path / "actor" / "model.bin").write_text(payload)

    return write


def _pointer(mgr):
    return (mgr.root / POINTER_FILE).read_text().strip()


def _names(mgr):
    return sorted(p.name for p in mgr.root.iterdir())


def test_save_layout_and_pointer(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(5, _writer(), {"sampler": {"epoch": 0, "pos": 3}})
    assert path == tmp_path / "checkpoints" / "global_step_5"
    assert (path / "actor" / "model.bin").read_text() == "weights"
    assert (path / STATE_FILE).is_file() and _pointer(mgr) == "5"
    assert _names(mgr) == ["global_step_5", POINTER_FILE]  # no temp files left
    assert mgr.load_trainer_state(path) == {
        "sampler": {"epoch": 0, "pos": 3},
        "step": 5,
        "format": STATE_FORMAT,
    }
    assert step_of(path) == 5


def test_crash_inside_write_fn_leaves_previous_state_untouched(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, _writer("one"), {})

    def crash(path):
        (path / "actor").mkdir()
        (path / "actor" / "half.bin").write_text("partial")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="killed mid-save"):
        mgr.save(2, crash, {})
    assert _names(mgr) == ["global_step_1", POINTER_FILE]  # no global_step_2, no temp dir
    assert _pointer(mgr) == "1"
    assert (mgr.root / "global_step_1" / "actor" / "model.bin").read_text() == "one"  # not pruned
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_1"


def test_unpicklable_state_fails_before_anything_is_committed(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        mgr.save(3, _writer(), {"fn": lambda: 0})
    assert _names(mgr) == []
    with pytest.raises(ValueError, match="step"):
        mgr.save(3, _writer(), {"step": 4})


def test_hard_crash_leftovers_are_ignored_then_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(2, _writer(), {})
    # a process killed mid-save leaves a temp dir (even with a state file in it) and a
    # foreign directory without a state file: neither is a checkpoint
    leftover = mgr.root / ".tmp-global_step_9-abc"
    leftover.mkdir()
    torch.save({"step": 9}, leftover / STATE_FILE)
    (mgr.root / "global_step_7").mkdir()
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_2"
    assert [step_of(p) for p in mgr.checkpoints()] == [2]
    mgr.save(3, _writer(), {})
    assert not leftover.exists()
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_3"


def test_keep_last_n_and_keep_all(tmp_path):
    mgr = CheckpointManager(tmp_path / "a", keep_last=2)
    for step in range(1, 6):
        mgr.save(step, _writer(str(step)), {})
    assert [step_of(p) for p in mgr.checkpoints()] == [4, 5] and _pointer(mgr) == "5"
    assert not [n for n in _names(mgr) if n.startswith(".")]
    keep_all = CheckpointManager(tmp_path / "b")
    for step in (1, 2, 3):
        keep_all.save(step, _writer(), {})
    assert [step_of(p) for p in keep_all.checkpoints()] == [1, 2, 3]
    with pytest.raises(ValueError, match="max_ckpt_to_keep"):
        CheckpointManager(tmp_path, keep_last=0)


def test_pruning_after_resuming_an_older_checkpoint_keeps_the_runs_own_steps(tmp_path):
    """Resumed from step 10 of 10/15/20 and saving 12 and 14 (keep 3), the run's line is
    10, 12, 14: pruning by step number alone kept 14, 15, 20, so `auto` had no fallback
    below 14. The abandoned 15 and 20 stay until the run saves those steps again."""
    mgr = CheckpointManager(tmp_path / "run", keep_last=3)
    for step in (10, 15, 20):
        mgr.save(step, _writer(), {})
    for step in (12, 14):  # resumed from global_step_10 by path
        mgr.save(step, _writer(), {})
    assert [step_of(p) for p in mgr.checkpoints()] == [10, 12, 14, 15, 20]
    mgr.save(15, _writer(), {})
    assert [step_of(p) for p in mgr.checkpoints()] == [12, 14, 15, 20]
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_15"


def test_resave_same_step_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(4, _writer("old"), {})
    mgr.save(4, _writer("new"), {"x": 1})
    assert (mgr.root / "global_step_4" / "actor" / "model.bin").read_text() == "new"
    assert mgr.load_trainer_state(mgr.root / "global_step_4")["x"] == 1
    assert _names(mgr) == ["global_step_4", POINTER_FILE]


def test_resolve_resume_modes(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    assert mgr.resolve_resume("auto") is None  # nothing saved yet
    assert mgr.resolve_resume("disable") is None
    for step in (2, 4, 6):
        mgr.save(step, _writer(), {})
    assert mgr.resolve_resume("disable") is None
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_6"
    explicit = mgr.root / "global_step_4"
    assert mgr.resolve_resume(str(explicit)) == explicit.resolve()
    # a run dir or its checkpoints dir resolves to its latest checkpoint
    other = CheckpointManager(tmp_path / "elsewhere")
    assert other.resolve_resume(str(tmp_path / "run")) == (mgr.root / "global_step_6").resolve()
    assert other.resolve_resume(str(mgr.root)) == (mgr.root / "global_step_6").resolve()
    # the pointer wins over a higher, abandoned step
    (mgr.root / POINTER_FILE).write_text("4\n")
    assert mgr.resolve_resume("auto") == explicit
    # a pointer naming a missing checkpoint falls back to the newest complete one
    (mgr.root / POINTER_FILE).write_text("8\n")
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_6"
    # CheckpointInvalid: the CLI prints it as one line (a ValueError was a traceback)
    with pytest.raises(CheckpointInvalid, match=r"trainer\.resume.*does not exist"):
        mgr.resolve_resume(str(tmp_path / "missing" / "global_step_3"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointInvalid, match="not a complete checkpoint"):
        mgr.resolve_resume(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        mgr.load_trainer_state(tmp_path / "empty")


def test_resume_refuses_a_checkpoint_of_another_actor_layout_before_anything_starts(tmp_path):
    """ZeRO partitions a checkpoint by stage and rank count. Resuming under others failed in
    DeepSpeed's load, once Ray and every worker had started; now the driver says so first."""
    import json

    from fipo_trainer.actor.checkpoint import MARKER
    from fipo_trainer.trainer.checkpoint_manifest import CheckpointInvalid

    def actor_of(stage, ranks):
        def write(path):
            (path / "actor").mkdir()
            (path / "actor" / MARKER).write_text(
                json.dumps({"zero_stage": stage, "world_size": ranks})
            )

        return write

    CheckpointManager(tmp_path / "run").save(2, actor_of(2, 1), {})
    same = CheckpointManager(tmp_path / "run", actor_layout=(2, 1))
    assert same.resolve_resume("auto") == same.root / "global_step_2"
    for layout, saved in (((2, 2), "zero_stage=2 on 1"), ((3, 1), "zero_stage=2 on 1")):
        other = CheckpointManager(tmp_path / "run", actor_layout=layout)
        for mode in ("auto", str(other.root / "global_step_2")):
            with pytest.raises(CheckpointInvalid, match=rf"saved by actor\.{saved} actor ranks"):
                other.resolve_resume(mode)
    # a checkpoint without the actor's marker (an older release's): DeepSpeed checks it
    CheckpointManager(tmp_path / "old").save(2, _writer(), {})
    old = CheckpointManager(tmp_path / "old", actor_layout=(2, 2))
    assert old.resolve_resume("auto") == old.root / "global_step_2"


def test_rng_states_and_config_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
        "config": {"trainer": {"seed": 0, "loggers": ["console", "jsonl"]}, "lr": 1e-6},
    }
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = CheckpointManager(tmp_path).save(1, _writer(), state)
    loaded = CheckpointManager(tmp_path).load_trainer_state(path)
    assert loaded["config"] == state["config"] and loaded["step"] == 1
    random.setstate(loaded["rng"]["python"])
    np.random.set_state(loaded["rng"]["numpy"])
    torch.set_rng_state(loaded["rng"]["torch"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_save_killed_before_its_pointer_write_is_still_resumed(tmp_path, monkeypatch):
    """``save`` moves the checkpoint into place, then writes the pointer. Killed (or out of
    disk) in between, `auto` took the pointer's older step: the newer save's steps were
    trained again. A step above the pointer written after it is such a save; steps above
    it written before it stay abandoned (a resume from an older one)."""
    mgr = CheckpointManager(tmp_path / "run")
    for step in (5, 10):
        mgr.save(step, _writer(), {})

    def killed(step):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mgr, "_write_pointer", killed)
    with pytest.raises(OSError):
        mgr.save(15, _writer(), {})
    monkeypatch.undo()
    assert _pointer(mgr) == "10" and (mgr.root / "global_step_15" / STATE_FILE).is_file()
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_15"
    assert mgr.latest() == mgr.root / "global_step_15"
    # the pointer rewritten later (a run resumed from step 5 saved step 6): 10 and 15 are
    # that run's abandoned steps again
    mgr.save(6, _writer(), {})
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_6"
    assert mgr.latest() == mgr.root / "global_step_6"
