"""CPU training processes yield cores to the rollout engine (``Platform.yield_cpu_to_rollout``).

Run in subprocesses: niceness only ever goes up in a process, so the test process keeps its own.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, torch
from fipo_trainer.platform import CPU_TRAINING_NICE_STEP, Platform
kind = {kind!r}
plat = Platform(kind, "gloo", "float32", "sdpa", kind)
start = os.nice(0)
got = plat.yield_cpu_to_rollout()
again = plat.yield_cpu_to_rollout()  # idempotent: never lowered twice
print(start, got, again, os.nice(0), CPU_TRAINING_NICE_STEP)
"""


def _run(kind: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(kind=kind)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return [int(v) for v in out]


def test_cpu_process_drops_its_priority_once() -> None:
    start, got, again, now, step = _run("cpu")
    assert got == again == now == min(19, start + step)
    assert now > start or start == 19  # a suite run at niceness 19 has no lower to go


def test_cuda_process_keeps_its_priority() -> None:
    start, got, again, now, _ = _run("cuda")
    assert got == again == now == start
