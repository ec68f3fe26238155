"""CLI wiring: Hydra composition from any directory, --cfg job, --dry-run, fipo-data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fipo_trainer import cli
from fipo_trainer.trainer.config import ConfigError, load_config

BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_cfg_job_prints_the_composed_recipe_without_running(tmp_path):
    res = run(
        [
            sys.executable,
            "-m",
            "fipo_trainer.cli",
            "--cfg",
            "job",
            "recipe=fipo_qwen2.5_32b_aime24",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    printed = OmegaConf.create(res.stdout)
    assert printed.actor.ulysses_sequence_parallel_size == 8
    assert printed.data.gen_batch_size == 2048
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing started


def test_console_script_dry_run_prints_the_final_config(tmp_path):
    script = BIN / "fipo-train"
    assert script.exists(), "the package is not installed in this venv (pip install -e .)"
    res = run([str(script), "--dry-run", "trainer.total_training_steps=7"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "config OK" in res.stderr
    cfg = load_config(OmegaConf.create(res.stdout), build_model=False)
    assert cfg.trainer.total_training_steps == 7
    assert cfg.rollout.max_model_len == 56  # derived values are filled in
    assert cfg.trainer.experiment_name == "quickstart_cpu"
    assert list(tmp_path.iterdir()) == []


def test_dry_run_reports_validation_errors(tmp_path):
    res = run(
        [sys.executable, "-m", "fipo_trainer.cli", "--dry-run", "recipe=fipo_qwen2.5_32b_aime24"],
        tmp_path,
    )
    assert res.returncode == 2
    assert "ulysses_sequence_parallel_size" not in res.stderr  # SP 8 is accepted now
    assert "actor layout: 128 actor ranks = 16 DP groups × SP 8" in res.stderr
    assert "data.train_files" in res.stderr


def test_hydra_main_validates_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    res = run(
        [str(BIN / "fipo-train"), "model=default", f"trainer.run_dir={run_dir}"],
        tmp_path,
    )
    assert res.returncode == 2, res.stderr
    assert "model.path is empty" in res.stderr
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # Hydra's record of the run


def test_unknown_recipe_is_a_config_error_listing_the_recipes():
    with pytest.raises(ConfigError, match=r"no option 'nope' in config group 'recipe'; "
                       r"available: .*quickstart_cpu"):  # fmt: skip
        cli.compose_config(["recipe=nope"])


@pytest.mark.parametrize(
    "override, said",
    [
        ("actor_rollout_ref.actor.optim.lr=1e-6", "here it is actor.lr"),
        ("actor_rollout_ref.rollout.n=16", "here it is rollout.n"),
        ("actor_rollout_ref.rollout.val_kwargs.top_p=0.7", "here it is rollout.val.top_p"),
        ("actor_rollout_ref.model.path=/m", "here it is model.path"),
        ("trainer.n_gpus_per_node=8", "here it is resources.gpus_per_node"),
        ("ray_kwargs.timeline_json_file=t.json", "here it is trainer.timeline_json_file"),
        # a verl name whose place here is deeper: the nearest key
        ("actor_rollout_ref.actor.clip_ratio_high=0.28", "did you mean actor.policy_loss.clip"),
    ],
)
def test_a_verl_key_is_answered_with_this_configs_key(override, said):
    """verl's nested names share no prefix with these keys, so difflib alone found none
    ("no key is close") for ``actor_rollout_ref.actor.optim.lr``."""
    with pytest.raises(ConfigError) as err:
        cli.compose_config([override])
    assert said in str(err.value) and override.split("=")[0] in str(err.value)


def test_a_value_of_the_wrong_type_is_one_line_naming_the_override(capsys):
    """``--dry-run`` printed two tracebacks; training printed Hydra's five-line report."""
    with pytest.raises(ConfigError, match=r"cannot set data\.max_response_length=abc: Value 'abc' "
                       r"of type 'str' could not be converted to Integer"):  # fmt: skip
        cli.compose_config(["data.max_response_length=abc"])
    assert cli.dry_run(["trainer.total_epochs=1.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot set trainer.total_epochs=1.5" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "value", ["/runs/lr=1e-6", "/tmp/x y,z[1]", "/tmp/it's", "/tmp/back\\slash", "/tmp/end\\", ""]
)
def test_quoted_override_reads_back_as_the_exact_string(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides(
        [cli.quoted_override("trainer.run_dir", value)]
    )
    assert override.value() == value


def test_an_unreadable_override_is_named_with_the_quoted_fix(tmp_path, capsys):
    from fipo_trainer.trainer.config import ConfigError

    run_dir = tmp_path / "lr=1e-6"  # a sweep-style name: '=' inside a value
    with pytest.raises(ConfigError) as err:
        cli.compose_config([f"trainer.run_dir={run_dir}"])
    fix = f"trainer.run_dir='{run_dir}'"
    assert "cannot read the override" in str(err.value) and fix in str(err.value)
    assert cli.compose_config([fix]).trainer.run_dir == str(run_dir)  # the fix works
    assert cli.dry_run([f"trainer.run_dir={run_dir}"]) == 2  # exit 2, not a traceback
    assert fix in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a sweep says the same before any job starts
        cli._check_sweep(["--multirun", f"trainer.run_dir={run_dir}", "trainer.seed=1,2"])
    assert stop.value.code == 2 and fix in capsys.readouterr().err


def test_config_dir_override_and_clear_error(monkeypatch, tmp_path):
    assert (cli.config_dir() / "config.yaml").is_file()
    monkeypatch.setenv(cli.CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=cli.CONFIG_DIR_ENV):
        cli.config_dir()


def test_fipo_data_writes_the_builtin_arithmetic_rows(tmp_path, capsys):
    import pandas as pd

    from fipo_trainer.data.synthetic import make_rows

    with pytest.raises(SystemExit) as exit_info:
        cli.data_main(
            ["arithmetic", "--out-dir", str(tmp_path), "--num-train", "5", "--num-val", "3"]
        )
    assert exit_info.value.code == 0
    train = pd.read_parquet(tmp_path / "train.parquet")
    assert len(train) == 5 and len(pd.read_parquet(tmp_path / "val.parquet")) == 3
    expected = make_rows(5, seed=0, split="train")
    assert list(train["reward_model"].map(lambda r: r["ground_truth"])) == [
        r["reward_model"]["ground_truth"] for r in expected
    ]
    assert "train: 5 rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("entry", "prog"), [("eval_main", "fipo-eval"), ("plot_main", "fipo-plot")]
)
def test_eval_and_plot_entry_points_delegate(entry, prog, capsys):
    with pytest.raises(SystemExit) as info:
        getattr(cli, entry)(["--help"])
    assert info.value.code == 0
    assert prog in capsys.readouterr().out


def test_train_task_validates_once_and_hands_the_config_to_the_loop(monkeypatch):
    from fipo_trainer.trainer import launch
    from fipo_trainer.trainer.config import TrainConfig, rules

    calls, ran = [], []
    real = rules.validate_config
    monkeypatch.setattr(rules, "validate_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(launch, "launch", ran.append)
    cli._train_task(cli.compose_config(["model.tiny.warm_start_steps=0"]))
    assert calls == [1]  # not once per conversion, and not again in the trainer
    (cfg,) = ran
    assert isinstance(cfg, TrainConfig) and Path(cfg.model.path, "config.json").is_file()


@pytest.mark.parametrize("trainer_started", [True, False])
def test_ctrl_c_exits_130_with_a_message_and_no_traceback(
    trainer_started, monkeypatch, tmp_path, capsys
):
    """Ctrl-C ends ``fipo-train`` with status 130 and a line, not a traceback through Hydra.
    Once the trainer runs it raises ``TrainingInterrupted``, having said where it stopped;
    earlier (config, tiny model) a bare KeyboardInterrupt arrives, and the CLI says so."""
    from fipo_trainer import startup
    from fipo_trainer.trainer import launch, loop

    def interrupted(cfg):
        if trainer_started:
            raise loop.TrainingInterrupted("interrupted (Ctrl-C) while waiting; workers stopped")
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "launch", interrupted)
    monkeypatch.setattr(startup, "pause_gc", lambda: None)  # this process keeps its GC
    args = ["model.tiny.warm_start_steps=0", f"trainer.run_dir={tmp_path / 'run'}"]
    caught: BaseException | None = None
    try:
        cli.train_main([*args, f"hydra.run.dir={tmp_path / 'run'}"])
    except BaseException as exc:  # a KeyboardInterrupt let through would end pytest itself
        caught = exc
    assert isinstance(caught, SystemExit) and caught.code == 130, repr(caught)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    before = "fipo-train: interrupted (Ctrl-C) before training started"
    assert (before in err) is not trainer_started, err


@pytest.mark.parametrize(
    "error, code",
    [
        ("ray", 2),  # resources.ray_address names no running cluster
        ("stopped", 1),  # e.g. dynamic sampling exhausted, reward failures in a row
    ],
)
def test_errors_that_name_their_fix_are_one_line_not_a_traceback(error, code, monkeypatch, capsys):
    """(A bad data row: tests/unit/test_data_bad_rows.py.)"""
    from fipo_trainer.cluster.ray_init import RayUnreachable
    from fipo_trainer.trainer import launch, loop

    message = f"the {error} message names what, where and the fix"
    raised = {"ray": RayUnreachable, "stopped": loop.TrainingStopped}[error]

    def fails(cfg):
        raise raised(message)

    monkeypatch.setattr(launch, "launch", fails)
    with pytest.raises(SystemExit) as exited:
        cli._train_task(cli.compose_config(["model.tiny.warm_start_steps=0"]))
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert f"fipo-train: {message}" in err and "Traceback" not in err


def test_a_home_relative_run_dir_is_one_directory_for_hydra_and_the_trainer(
    tmp_path, monkeypatch
):
    """``fipo-train trainer.run_dir=~/run``: Hydra's ``.hydra/`` and the trainer's files go
    to ``$HOME/run``; Hydra used to write into ``./~/run`` (after a parse error unquoted)."""
    from fipo_trainer import startup
    from fipo_trainer.trainer import launch

    seen = []
    monkeypatch.setattr(launch, "launch", seen.append)
    monkeypatch.setattr(startup, "pause_gc", lambda: None)  # this process keeps its GC
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cli.train_main(["model.tiny.warm_start_steps=0", "trainer.run_dir=~/run"])
    assert (home / "run" / ".hydra" / "config.yaml").is_file()
    assert list(cwd.iterdir()) == []
    assert seen[0].trainer.run_dir == str(home / "run")


def test_the_run_dir_hold_is_reentrant_and_still_refuses_another_process(tmp_path):
    """train_main holds a single run's directory before Hydra writes into it and the task
    holds the one it trains in: the same directory must not be refused to its own process."""
    from fipo_trainer.run_dir_hold import hold_run_dir

    run_dir = tmp_path / "run"
    other = [sys.executable, "-c", "from fipo_trainer.run_dir_hold import hold_run_dir\n"
             f"with hold_run_dir({str(run_dir)!r}): pass"]
    with hold_run_dir(run_dir), hold_run_dir(tmp_path / "x" / ".." / "run"), hold_run_dir(None):
        res = run(other, tmp_path)
        assert res.returncode != 0 and "RunDirInUse" in res.stderr, res.stderr[-2000:]
    assert run(other, tmp_path).returncode == 0  # released with the outer hold
