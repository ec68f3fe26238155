"""A rollout worker that exits next stops its vLLM engine with the heap kept frozen: vLLM's
shutdown would otherwise unfreeze it and collect it whole (≈ 1 s per engine at the end of
every run; ``fipo_trainer.startup.heap_stays_frozen``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import gc, json, os, sys, time
from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.rollout import RolloutConfig, SamplingConfig, build_engine
from fipo_trainer.startup import heap_stays_frozen

engine = build_engine(
    build_tiny_model(warm_start_steps=0),
    RolloutConfig(engine="vllm", max_model_len=128, max_tokens=8, n=1, max_num_seqs=8),
)
engine.generate([[1, 2, 3]] * 2, SamplingConfig(max_tokens=8, n=1, seed=0))
built = gc.get_freeze_count()  # vLLM froze its start-up heap
start = time.perf_counter()
if sys.argv[1] == "exiting":
    with heap_stays_frozen():
        engine.shutdown()
else:
    engine.shutdown()
print("RESULT", json.dumps({"built": built, "after": gc.get_freeze_count(),
                            "seconds": time.perf_counter() - start}))
"""


def _shutdown(mode: str) -> dict:
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
           "TORCH_COMPILE_DISABLE": "1"}  # fmt: skip
    import os

    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    print(mode, line)
    return json.loads(line.split(" ", 1)[1])


def test_vllm_unfreezes_the_heap_when_it_stops_and_an_exiting_worker_keeps_it_frozen():
    plain = _shutdown("plain")
    assert plain["built"] > 100_000 and plain["after"] == 0  # why the helper exists
    exiting = _shutdown("exiting")
    # still frozen (objects whose last reference went, the engine's, left it)
    assert exiting["after"] > exiting["built"] * 0.9 > 100_000
