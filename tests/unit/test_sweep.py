"""Multirun without Ray: job directory names, the sweep's job list (command line and the
recipes' ``hydra.sweeper.params``), ``--dry-run --multirun`` validating every job, a bad job
stopping the sweep before anything starts, and the summary CSV read from run dirs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fipo_trainer import cli
from fipo_trainer.trainer.sweep import (
    JOB_RECORD,
    SUMMARY_CSV,
    dirname_override,
    expand_sweep,
    job_dir_name,
    summarize_sweep,
    varying_overrides,
    write_summary_csv,
)
from fipo_trainer.trainer.tracking import Tracker

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_job_dir_names():
    assert job_dir_name("algorithm=dapo,trainer.seed=1", 3) == "algorithm=dapo,trainer.seed=1"
    assert job_dir_name("data.data_dir=/x/y", 0) == "data.data_dir=_x_y"  # never nests
    assert job_dir_name("", 4) == "job4"
    long = job_dir_name("a=" + "x" * 500, 0)
    assert len(long) <= 200 and long != job_dir_name("a=" + "x" * 499 + "y", 0)


def test_expand_sweep_is_the_cartesian_product_and_the_command_line_wins():
    jobs = expand_sweep(["algorithm=fipo,dapo", "trainer.seed=0,1", "trainer.test_freq=3"])
    assert len(jobs) == 4
    assert jobs[0] == ["algorithm=fipo", "trainer.seed=0", "trainer.test_freq=3"]
    params = {"algorithm": "fipo,dapo", "trainer.seed": "0,1,2"}
    assert len(expand_sweep([], params)) == 6
    assert len(expand_sweep(["trainer.seed=7"], params)) == 2  # overrides the param's sweep


def test_job_directories_are_named_by_what_the_sweep_varies():
    jobs = expand_sweep(["algorithm=fipo,dapo", "trainer.test_freq=3", "trainer.loggers=[a,b]"])
    extra = dirname_override([], jobs)
    assert extra is not None and extra.startswith("hydra.job.config.override_dirname.exclude_keys=")
    for key in ("trainer.run_dir", "trainer.test_freq", "trainer.loggers"):
        assert f"'{key}'" in extra
    assert "'algorithm'" not in extra
    assert dirname_override([extra], jobs) is None  # the user's own setting is kept


@pytest.mark.parametrize(
    ("recipe", "count", "varying"),
    [
        ("fipo_vs_dapo", 6, {"algorithm", "trainer.seed"}),
        ("participation_filter", 2, {"actor.policy_loss.participation_filter"}),
        ("decay_rate", 4, {"actor.policy_loss.decay_rate"}),
        ("influence_clip", 4, {"actor.policy_loss.future_kl_clip_high_only",
                               "actor.policy_loss.future_kl_clip_ratio"}),
    ],
)
def test_ablation_recipes_expand_to_valid_cpu_jobs(recipe, count, varying):
    jobs = cli.sweep_jobs(["--multirun", f"recipe=ablations/{recipe}"])
    assert len(jobs) == count
    keys = {o.split("=", 1)[0] for job in jobs for o in job}
    assert varying | {"recipe"} == keys
    for job in jobs:
        assert cli.job_errors(job) == [], job
    cfg = cli.compose_config(jobs[-1])
    assert cfg.resources.gpus_per_node == 0 and cfg.model.tiny.enable  # the CPU quickstart's
    assert cfg.trainer.experiment_name == f"ablation_{recipe}"


def test_dry_run_multirun_validates_every_job_and_names_the_bad_one(tmp_path):
    res = run(
        [str(BIN / "fipo-train"), "--dry-run", "--multirun", "algorithm=fipo,dapo",
         "actor.ppo_mini_batch_size=4,5"],
        tmp_path,
    )
    assert res.returncode == 2, res.stderr
    assert "job 0: algorithm=fipo actor.ppo_mini_batch_size=4: OK" in res.stdout
    assert "job 1: algorithm=fipo actor.ppo_mini_batch_size=5: ERROR" in res.stdout
    assert "job 3: algorithm=dapo actor.ppo_mini_batch_size=5: ERROR" in res.stdout
    assert "actor.ppo_mini_batch_size=5" in res.stderr and "2 of 4 jobs invalid" in res.stderr
    good = run([str(BIN / "fipo-train"), "--dry-run", "-m", "algorithm=fipo,dapo"], tmp_path)
    assert good.returncode == 0, good.stderr
    assert "all 2 jobs OK" in good.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_a_bad_job_stops_the_sweep_before_anything_starts(tmp_path):
    sweep_dir = tmp_path / "sweep"
    res = run(
        [str(BIN / "fipo-train"), "--multirun", "algorithm=fipo,dapo", "actor.lrr=1",
         f"hydra.sweep.dir={sweep_dir}"],
        tmp_path,
    )
    assert res.returncode == 2, res.stderr
    assert "did you mean actor.lr?" in res.stderr and "2 of 2 sweep jobs invalid" in res.stderr
    assert not sweep_dir.exists()


def test_a_swept_run_dir_is_refused_naming_the_sweep_dir(tmp_path):
    """Each job runs in <sweep dir>/<its overrides>, and a sweep has one sweep dir: swept,
    trainer.run_dir a,b would be ignored (both jobs under the default's run dir)."""
    for dry in ([], ["--dry-run"]):  # the dry run refuses what the run would
        res = run([str(BIN / "fipo-train"), *dry, "--multirun", "trainer.run_dir=a,b"], tmp_path)
        assert res.returncode == 2, res.stderr
        assert "trainer.run_dir cannot be swept" in res.stderr, res.stderr
        assert "hydra.sweep.dir=" in res.stderr
        assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


# The training task replaced by a no-op: Hydra's multirun, the config tree, the CLI's
# pre-flight and the SweepSummary callback are the real ones.
NO_TRAINING = (
    "import sys; from fipo_trainer import cli; "
    "cli._train_task = lambda cfg: None; cli.train_main(sys.argv[1:])"
)


@pytest.mark.parametrize(
    "sweep",
    [
        ["recipe=quickstart_cpu,quickstart_cpu_async"],  # each recipe its own trainer.run_dir
        ["trainer.experiment_name=x,y"],
        ["trainer.experiment_name=x,y", "hydra.sweep.dir=mine"],  # the user's own sweep dir
    ],
)
def test_a_sweep_over_any_key_has_one_sweep_dir_listing_every_job(tmp_path, sweep):
    res = run([sys.executable, "-c", NO_TRAINING, "--multirun", *sweep], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = list(tmp_path.glob(f"**/{SUMMARY_CSV}"))
    assert len(summaries) == 1, summaries  # one sweep directory per invocation
    sweep_dir = summaries[0].parent
    if any(a.startswith("hydra.sweep.dir=") for a in sweep):
        assert sweep_dir == tmp_path / "mine"
    table = list(csv.DictReader(summaries[0].open()))
    values = sweep[0].split("=", 1)[1].split(",")
    assert [r["overrides"] for r in table] == [f"{sweep[0].split('=')[0]}={v}" for v in values]
    job_dirs = [tmp_path / r["run_dir"] for r in table]  # relative to the working dir
    assert len(set(job_dirs)) == len(values)  # each job keeps its own directory
    assert all(d.parent.resolve() == sweep_dir.resolve() for d in job_dirs), job_dirs
    assert all((d / ".hydra").is_dir() and r["status"] == "completed"
               for d, r in zip(job_dirs, table))


def _fake_job(sweep_dir: Path, num: int, overrides: list[str], vals: list[float] | None) -> None:
    run_dir = sweep_dir / job_dir_name(",".join(overrides), num)
    with Tracker(["jsonl"], run_dir, "p", "e", {}, 3) as t:
        for step in range(4):
            row = {"reward/score_mean": 0.1 * step}
            if vals is not None and step % 3 == 0:
                row |= {"val/mean@4": vals[step // 3], "val/arith/mean@4": 0.0}
            if step:
                t.log(row, step=step)
            elif vals is not None:
                t.log({k: v for k, v in row.items() if k.startswith("val/")}, step=0)
    record = {"num": num, "overrides": overrides, "status": "completed", "wall_s": 12.5 * (num + 1)}
    (run_dir / JOB_RECORD).write_text(json.dumps(record))


def test_summary_rows_and_csv_come_from_the_run_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_job(sweep, 1, ["algorithm=dapo", "trainer.test_freq=3"], [0.25, 0.5])
    _fake_job(sweep, 0, ["algorithm=fipo", "trainer.test_freq=3"], [0.25, 0.75])
    _fake_job(sweep, 2, ["algorithm=grpo", "trainer.test_freq=3"], None)
    rows = summarize_sweep(sweep)
    assert [r.job for r in rows] == [0, 1, 2]
    fipo = rows[0]
    assert (fipo.steps, fipo.val_metric) == (3, "val/mean@4")
    assert (fipo.val_first, fipo.val_best, fipo.val_last, fipo.wall_s) == (0.25, 0.75, 0.75, 12.5)
    assert rows[2].val_first is None and rows[2].steps == 3
    shown, common = varying_overrides(rows)
    assert shown == ["algorithm=fipo", "algorithm=dapo", "algorithm=grpo"]
    assert common == ["trainer.test_freq=3"]
    path = write_summary_csv(rows, sweep / "sweep_summary.csv")
    table = list(csv.DictReader(path.open()))
    assert table[0]["overrides"] == "algorithm=fipo trainer.test_freq=3"
    assert table[1]["val_best"] == "0.5" and table[2]["val_best"] == ""
    assert set(table[0]) >= {"overrides", "steps", "val_first", "val_best", "val_last", "wall_s"}
