"""``python -m fipo_trainer.cpu_ops`` (what scripts/setup.sh runs) really builds DeepSpeed's
CPU comm op where the ranks look for it, and a rank then loads it without compiling.

One real build into a fresh directory: ≈ 30-90 s on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fipo_trainer import cpu_ops
from fipo_trainer.platform import EXTENSIONS_DIR_ENV

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(cpu_ops.current_platform().is_cuda, reason="DeepSpeed's CPU op"),
]

REPO = Path(__file__).resolve().parents[2]

# What every DeepSpeed rank on a CPU node runs when its comm backend starts.
RANK_LOADS_OP = """
import time
from deepspeed.comm.torch import build_shm_op
start = time.perf_counter()
op = build_shm_op()
print("loaded", op is not None and hasattr(op, "initialize"), round(time.perf_counter() - start, 2))
"""


def run(args: list[str], extensions_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, EXTENSIONS_DIR_ENV: str(extensions_dir), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_setup_builds_the_op_and_a_rank_then_compiles_nothing(tmp_path: Path) -> None:
    built = run(["-m", "fipo_trainer.cpu_ops"], tmp_path)
    library = cpu_ops.built_op(tmp_path)
    assert library is not None, built.stdout
    assert "built in" in built.stdout and str(library) in built.stdout
    stamp = library.stat().st_mtime_ns

    loaded = run(["-c", RANK_LOADS_OP], tmp_path)
    assert "loaded True" in loaded.stdout, loaded.stdout + loaded.stderr
    assert library.stat().st_mtime_ns == stamp  # not rebuilt
    assert cpu_ops.pending_build_message({EXTENSIONS_DIR_ENV: str(tmp_path)}) is None

    again = run(["-m", "fipo_trainer.cpu_ops"], tmp_path)
    assert f"already built: {library}" in again.stdout
