"""scripts/bench_startup_gc.py: a role's start-up runs in a fresh process in either GC mode,
and the paused mode really runs with the GC off until the role is built."""

from __future__ import annotations

from tests.helpers.scripts import load_script

bs = load_script("bench_startup_gc")


def test_the_driver_role_builds_in_a_fresh_process_in_both_modes(warm_tiny_model):
    on = bs.run_child("driver", "gc_on", str(warm_tiny_model))
    paused = bs.run_child("driver", "gc_paused", str(warm_tiny_model))
    for result in (on, paused):
        assert result["cpu_s"] > 0.5 and result["wall_s"] > 0  # torch was imported: real work
    assert paused["gc_during_build"] is False and on["gc_during_build"] is True
