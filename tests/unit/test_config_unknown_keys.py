"""Unknown config keys are caught at composition with the closest valid keys, not Hydra's
"+key=value" advice, which only moves the failure later (issue 12, item 7)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fipo_trainer import cli
from fipo_trainer.trainer.config import ConfigError


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("actor.lrr=1", "actor.lrr", "actor.lr"),  # a typo in the key
        ("actr.lr=1", "actr.lr", "actor.lr"),  # a typo in the section
        ("data.trainer_batch_size=3", "data.trainer_batch_size", "data.train_batch_size"),
        ("actor.policy_loss.clip_ratio_lo=0.1", "actor.policy_loss.clip_ratio_lo",
         "actor.policy_loss.clip_ratio_low"),  # deeper nesting
    ],
)
def test_compose_config_names_the_closest_key(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        cli.compose_config([override])
    (msg,) = err.value.errors
    first = f"unknown config key {key}; did you mean {suggestion}"
    assert msg == first + "?" or msg.startswith(first + " or "), msg  # the nearest comes first


def test_every_unknown_key_is_reported_and_plus_still_adds_free_form_keys():
    with pytest.raises(ConfigError) as err:
        cli.compose_config(["actor.lrr=1", "trainer.total_training_steps=3", "actr.lr=2"])
    assert [e.split(";")[0] for e in err.value.errors] == [
        "unknown config key actor.lrr",
        "unknown config key actr.lr",
    ]
    cfg = cli.compose_config(["+model.override_config.rope_theta=1.0"])
    assert cfg.model.override_config.rope_theta == 1.0


def test_dry_run_exits_2_on_an_unknown_key(capsys):
    assert cli.dry_run(["actor.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key actor.lrr; did you mean actor.lr?" in err
    assert "+actor.lrr" not in err


def test_hydra_main_exits_2_on_an_unknown_key_without_a_traceback(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "fipo_trainer.cli", "actr.lr=1", f"trainer.run_dir={tmp_path}/r"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "unknown config key actr.lr; did you mean actor.lr?" in res.stderr
    assert "Traceback" not in res.stderr and "+actr.lr" not in res.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory: nothing started
