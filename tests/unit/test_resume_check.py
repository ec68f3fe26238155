"""Resuming: the settings a checkpoint's state was made under are checked before anything
starts, and a run resumed from another run's checkpoint sets this directory's run aside.

Before: resumed with another ``data.shuffle``/``data.seed`` the prompt order changed
silently (prompts repeated, others skipped; the checkpoint's seed won); with another
``trainer.async_mode`` the batches made ahead failed at the first step, after Ray,
DeepSpeed and vLLM had started; and a run resumed from elsewhere overwrote, truncated and
pruned the earlier run in its run directory.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.checkpoint import CheckpointManager
from fipo_trainer.trainer.checkpoint_manifest import CheckpointInvalid
from fipo_trainer.trainer.config import load_config
from fipo_trainer.trainer.loop import RLTrainer
from fipo_trainer.trainer.resume_check import resume_mismatches


def config(run_dir: Path, *overrides: str):
    return load_config(
        compose_config([f"trainer.run_dir={run_dir}", *overrides]), build_model=False
    )


def save(run_dir: Path, step: int, cfg, ahead: int = 0) -> Path:
    """A checkpoint as the trainer writes it (the actor's files stand in for DeepSpeed's)."""
    state = {
        "step": step,
        "sampler": {"epoch": 0, "position": 16 * step, "seed": cfg.data.seed, "num_rows": 64},
        "pipeline": {"ahead": [{"step": step + 1 + i} for i in range(ahead)], "version": step},
        "config": dataclasses.asdict(cfg),
    }

    def actor(path: Path) -> None:
        (path / "actor").mkdir()
        (path / "actor" / "weights.bin").write_bytes(b"w" * 64)

    return CheckpointManager(run_dir).save(step, actor, state)


def test_only_the_settings_that_made_the_state_are_compared(tmp_path):
    cfg = config(tmp_path)
    saved = {"config": dataclasses.asdict(cfg), "pipeline": {"ahead": []}}
    assert resume_mismatches(saved, cfg) == []
    assert resume_mismatches({"pipeline": {}}, cfg) == []  # an older release's: no config
    other = config(tmp_path, "data.seed=5", "data.shuffle=false", "trainer.async_mode=one_step")
    # no batch made ahead: the async mode may change, the prompt order may not
    assert resume_mismatches(saved, other) == [
        ("data.shuffle", True, False),
        ("data.seed", cfg.data.seed, 5),
    ]
    saved["pipeline"]["ahead"] = [{"step": 3}]
    assert ("trainer.async_mode", "off", "one_step") in resume_mismatches(saved, other)


@pytest.mark.parametrize(
    "changed, ahead, names",
    [
        ("data.seed=7", 0, ["data.seed: 0 in the checkpoint, 7 now", "prompt order"]),
        (
            "trainer.async_mode=off",
            1,
            ["trainer.async_mode: 'one_step' in the checkpoint, 'off' now", "1 batch(es) made"],
        ),
    ],
)
def test_a_changed_setting_fails_before_anything_starts(tmp_path, changed, ahead, names):
    run_dir = tmp_path / "run"
    path = save(run_dir, 2, config(run_dir, "trainer.async_mode=one_step"), ahead=ahead)
    t = RLTrainer(config(run_dir, "trainer.async_mode=one_step", "trainer.resume=auto", changed))
    with pytest.raises(CheckpointInvalid) as err:
        t.prepare_resume()
    text = str(err.value)
    assert str(path) in text and all(n in text for n in names), text
    assert f"Resume with {changed.split('=')[0]}=" in text and "trainer.resume=disable" in text


def test_the_same_settings_resume(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config(run_dir, "trainer.async_mode=one_step", "trainer.resume=auto")
    path = save(run_dir, 2, cfg, ahead=1)
    t = RLTrainer(cfg)
    t.prepare_resume()
    assert t._resume[0] == path and t._resume[1]["step"] == 2


def test_resuming_another_runs_checkpoint_sets_this_directorys_run_aside(tmp_path, caplog):
    other, run_dir = tmp_path / "other", tmp_path / "run"
    source = save(other, 5, config(other))
    save(run_dir, 10, config(run_dir))  # an earlier run here, further along
    (run_dir / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(1, 11)))
    t = RLTrainer(config(run_dir, f"trainer.resume={source}"))
    with caplog.at_level(logging.WARNING):
        t.prepare_resume()
    assert t._resume[0] == source
    (earlier,) = (run_dir / "earlier_runs").iterdir()
    assert len((earlier / "metrics.jsonl").read_text().splitlines()) == 10
    assert [p.name for p in CheckpointManager(earlier).checkpoints()] == ["global_step_10"]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert f"continues another run's checkpoint ({source})" in caplog.text


def test_resuming_this_runs_own_checkpoint_keeps_its_files(tmp_path):
    run_dir = tmp_path / "run"
    own = save(run_dir, 4, config(run_dir))
    (run_dir / "metrics.jsonl").write_text('{"step": 4}\n')
    t = RLTrainer(config(run_dir, f"trainer.resume={own}"))
    t.prepare_resume()
    assert t._resume[0] == own and (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "earlier_runs").exists()


def test_changed_training_data_fails_before_any_worker_starts(tmp_path, monkeypatch):
    """The checkpoint's prompt order is for 64 prompts; the data now has 40. That failed in
    ``maybe_resume``, after Ray and every worker had started; now ``fit`` loads the data
    and the sampler state first (tokenizing needs no worker)."""
    from fipo_trainer.data.records import DataError

    run_dir = tmp_path / "run"
    save(run_dir, 2, config(run_dir))
    cfg = load_config(
        compose_config(
            [f"trainer.run_dir={run_dir}", "trainer.resume=auto", "data.synthetic.num_train=40"]
        )
    )
    started = []
    monkeypatch.setattr(RLTrainer, "_start_roles", lambda self: started.append("roles"))
    with pytest.raises(DataError, match="sampler state is for 64 prompts but the training data "
                       "now has 40"):  # fmt: skip
        RLTrainer(cfg).fit()
    assert started == []
