"""Checkpoint manifests: written last, verified before resuming, fallback to the newest valid
checkpoint, pre-manifest checkpoints accepted with a warning, crash leftovers cleaned, and
trainer state loaded with ``weights_only=True`` (no pickled code runs)."""

from __future__ import annotations

import json
import logging
import pathlib
import random

import numpy as np
import pytest
import torch

from fipo_trainer.actor.checkpoint import read_marker, write_marker
from fipo_trainer.data.sampler import ResumableSampler
from fipo_trainer.fsutil import MANIFEST_FILE
from fipo_trainer.trainer.checkpoint import (
    POINTER_FILE,
    STATE_FILE,
    CheckpointInvalid,
    CheckpointManager,
    rng_state,
    set_rng_state,
)

LOGGER = "fipo_trainer.trainer"


def _actor_writer(payload: str = "weights"):
    """Like the DeepSpeed actor: shards, then the marker and its nested manifest."""

    def write(path):
        actor = path / "actor"
        (actor / "deepspeed").mkdir(parents=True)
        (actor / "deepspeed" / "mp_rank_00_model_states.pt").write_text(payload * 100)
        (actor / "latest").write_text("deepspeed")
        write_marker(actor, {"zero_stage": 2, "world_size": 2, "weights_version": 1})

    return write


def _run(tmp_path, steps=(1, 2)):
    mgr = CheckpointManager(tmp_path / "run")
    for step in steps:
        mgr.save(step, _actor_writer(str(step)), {"sampler": {"epoch": 0, "position": step}})
    return mgr


def _truncate(file: pathlib.Path, keep: int = 10) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:keep])


def test_every_checkpoint_and_its_actor_dir_carry_a_manifest(tmp_path):
    mgr = _run(tmp_path, steps=(3,))
    ckpt = mgr.root / "global_step_3"
    top = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    # the actor's shards are covered by the actor's own manifest, hashed once
    assert set(top) == {STATE_FILE, "actor/" + MANIFEST_FILE}
    assert top[STATE_FILE]["size"] == (ckpt / STATE_FILE).stat().st_size
    assert len(top[STATE_FILE]["sha256"]) == 64
    actor = json.loads((ckpt / "actor" / MANIFEST_FILE).read_text())["files"]
    assert set(actor) == {
        "deepspeed/mp_rank_00_model_states.pt",
        "latest",
        "fipo_actor_checkpoint.json",
    }
    assert read_marker(ckpt / "actor")["zero_stage"] == 2
    assert mgr.resolve_resume("auto") == ckpt


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda c: _truncate(c / STATE_FILE), STATE_FILE),
        (lambda c: (c / STATE_FILE).unlink(), f"{STATE_FILE} is missing"),
        (
            lambda c: (c / "actor/deepspeed/mp_rank_00_model_states.pt").write_text("2" * 100),
            "actor/deepspeed/mp_rank_00_model_states.pt has a different sha256",
        ),
        (
            lambda c: (c / "actor/deepspeed/mp_rank_00_model_states.pt").unlink(),
            "actor/deepspeed/mp_rank_00_model_states.pt is missing",
        ),
        (lambda c: (c / MANIFEST_FILE).unlink(), f"{MANIFEST_FILE} is missing"),
        (lambda c: (c / MANIFEST_FILE).write_text("{not json"), f"{MANIFEST_FILE} is unreadable"),
    ],
)
def test_auto_falls_back_to_newest_valid_and_names_the_broken_file(tmp_path, caplog, damage, named):
    mgr = _run(tmp_path, steps=(1, 2, 3))
    damage(mgr.root / "global_step_3")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert mgr.resolve_resume("auto") == mgr.root / "global_step_2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("global_step_3" in w and named in w for w in warnings), warnings
    assert mgr.load_trainer_state(mgr.root / "global_step_2")["step"] == 2


def test_auto_with_no_valid_checkpoint_is_an_error_naming_each_broken_file(tmp_path):
    mgr = _run(tmp_path, steps=(1, 2))
    _truncate(mgr.root / "global_step_2" / STATE_FILE)
    (mgr.root / "global_step_1" / "actor" / "latest").write_text("tampered")
    with pytest.raises(CheckpointInvalid) as err:
        mgr.resolve_resume("auto")
    msg = str(err.value)
    assert f"global_step_2: {STATE_FILE} has 10 bytes" in msg
    assert "global_step_1: actor/latest has 8 bytes" in msg
    assert "trainer.resume=<path" in msg and "trainer.resume=disable" in msg
    assert mgr.resolve_resume("disable") is None
    assert CheckpointManager(tmp_path / "fresh").resolve_resume("auto") is None


def test_pointer_first_then_older_steps_never_an_abandoned_newer_one(tmp_path):
    mgr = _run(tmp_path, steps=(1, 2, 3))
    (mgr.root / POINTER_FILE).write_text("2\n")  # step 3 was abandoned by a resume from 2
    _truncate(mgr.root / "global_step_2" / STATE_FILE)
    assert mgr.resolve_resume("auto") == mgr.root / "global_step_1"


def test_explicit_broken_path_is_an_error_naming_the_file(tmp_path):
    mgr = _run(tmp_path, steps=(1, 2))
    _truncate(mgr.root / "global_step_2" / STATE_FILE)
    with pytest.raises(CheckpointInvalid, match=rf"global_step_2 is broken: {STATE_FILE} has 10"):
        mgr.resolve_resume(str(mgr.root / "global_step_2"))
    with pytest.raises(CheckpointInvalid, match=STATE_FILE):  # a run dir: its latest, strictly
        CheckpointManager(tmp_path / "other").resolve_resume(str(tmp_path / "run"))
    good = mgr.root / "global_step_1"
    assert mgr.resolve_resume(str(good)) == good.resolve()


def test_pre_manifest_checkpoint_is_accepted_with_a_warning(tmp_path, caplog):
    """What the previous release wrote: no manifest, raw RNG tuples and numpy arrays."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    old = tmp_path / "run" / "checkpoints" / "global_step_4"
    (old / "actor").mkdir(parents=True)
    (old / "actor" / "fipo_actor_checkpoint.json").write_text('{"zero_stage": 2}')
    raw = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    sampler = {"epoch": np.int64(1), "position": 3, "seed": 0, "num_rows": 16}
    torch.save(
        {"step": 4, "rng": raw, "sampler": sampler, "config": {"a": (1, None)}}, old / STATE_FILE
    )
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    mgr = CheckpointManager(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert mgr.resolve_resume("auto") == old
    assert any("before checkpoint manifests" in r.getMessage() for r in caplog.records)
    state = mgr.load_trainer_state(old)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert read_marker(old / "actor") == {"zero_stage": 2}
    # once this release has written into a directory, a missing manifest is damage
    mgr.save(5, _actor_writer(), {"rng": rng_state()})
    (mgr.root / "global_step_5" / MANIFEST_FILE).unlink()
    assert mgr.resolve_resume("auto") == old


def test_leftover_temp_dirs_are_cleaned_at_start_up_with_a_log_line(tmp_path, caplog):
    mgr = _run(tmp_path, steps=(1,))
    crashed = mgr.root / ".tmp-global_step_2-ab12cd"
    (crashed / "actor").mkdir(parents=True)
    (crashed / STATE_FILE).write_bytes(b"half")
    deleting = mgr.root / ".old-global_step_0-ffff"
    deleting.mkdir()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert mgr.clean_leftovers() == [deleting, crashed]
    assert not crashed.exists() and not deleting.exists()
    assert sum("leftover temporary checkpoint" in r.getMessage() for r in caplog.records) == 2
    assert sorted(p.name for p in mgr.root.iterdir()) == ["global_step_1", POINTER_FILE]


class _Payload:
    """What a crafted trainer_state.pt could carry: unpickling it calls a function."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_crafted_pickle_payload_in_trainer_state_is_refused(tmp_path):
    mgr = _run(tmp_path, steps=(1,))
    ckpt = mgr.root / "global_step_1"
    marker = tmp_path / "code_ran"
    torch.save({"step": 1, "evil": _Payload(marker)}, ckpt / STATE_FILE)
    with pytest.raises(CheckpointInvalid, match="weights_only"):
        mgr.load_trainer_state(ckpt)
    assert not marker.exists()
    # and the manifest no longer matches, so resuming never gets that far
    with pytest.raises(CheckpointInvalid, match=STATE_FILE):
        mgr.resolve_resume(str(ckpt))
    assert not marker.exists()


def test_new_trainer_state_loads_with_plain_weights_only(tmp_path):
    """RNG and sampler states are tensors and plain types: no allow-list needed."""
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    sampler = ResumableSampler(16, seed=np.int64(3))
    sampler.next_indices(4)
    state = {"step": 1, "rng": rng_state(), "sampler": sampler.state_dict()}
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item())
    path = CheckpointManager(tmp_path).save(1, _actor_writer(), state)
    loaded = torch.load(path / STATE_FILE, weights_only=True)  # raises on any numpy object
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()) == expected
    restored = ResumableSampler(16, seed=0)
    restored.load_state_dict(loaded["sampler"])
    assert restored.next_indices(4) == sampler.next_indices(4)


def test_fit_verifies_the_checkpoint_before_starting_any_role(tmp_path, monkeypatch):
    from fipo_trainer.cli import compose_config
    from fipo_trainer.trainer.config import prepare_config
    from fipo_trainer.trainer.loop import RLTrainer

    run = tmp_path / "run"
    mgr = _run(tmp_path, steps=(1,))
    _truncate(mgr.root / "global_step_1" / STATE_FILE)
    cfg = prepare_config(compose_config([f"trainer.run_dir={run}", "trainer.resume=auto"]))
    started = []
    monkeypatch.setattr(RLTrainer, "_start_roles", lambda self: started.append("roles"))
    monkeypatch.setattr(RLTrainer, "_build_data", lambda self: started.append("data"))
    with pytest.raises(CheckpointInvalid, match=STATE_FILE):
        RLTrainer(cfg).fit()
    assert started == []
