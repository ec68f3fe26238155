"""scripts/bench_startup_gc.py: a role's start-up runs in a fresh process in either GC mode,
and the paused mode really runs with the GC off until the role is built."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load():
    path = REPO / "scripts" / "bench_startup_gc.py"
    spec = importlib.util.spec_from_file_location("bench_startup_gc", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_startup_gc"] = module
    spec.loader.exec_module(module)
    return module


bs = _load()


def test_the_driver_role_builds_in_a_fresh_process_in_both_modes(warm_tiny_model):
    on = bs.run_child("driver", "gc_on", str(warm_tiny_model))
    paused = bs.run_child("driver", "gc_paused", str(warm_tiny_model))
    for result in (on, paused):
        assert result["cpu_s"] > 0.5 and result["wall_s"] > 0  # torch was imported: real work
    assert paused["gc_during_build"] is False and on["gc_during_build"] is True
