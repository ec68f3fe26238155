"""cluster.startup_gc: the GC paused while a process starts, the start-up heap frozen after."""

from __future__ import annotations

import gc
import time

import pytest

from fipo_trainer.cluster import startup_gc


@pytest.fixture(autouse=True)
def restore_gc():
    yield
    startup_gc.settle_gc()
    gc.unfreeze()
    gc.enable()


def test_pause_then_settle_freezes_the_heap_and_turns_the_gc_back_on():
    gc.unfreeze()
    startup_gc.pause_gc(settle_after_s=None)
    assert not gc.isenabled()
    garbage = [object() for _ in range(1000)]
    assert startup_gc.settle_gc() is True
    assert gc.isenabled() and gc.get_freeze_count() >= len(garbage)
    assert startup_gc.settle_gc() is False  # once only


def test_the_heap_is_frozen_early_only_while_starting():
    gc.unfreeze()
    assert startup_gc.freeze_if_paused() is False and gc.get_freeze_count() == 0
    startup_gc.pause_gc(settle_after_s=None)
    assert startup_gc.freeze_if_paused() is True and gc.get_freeze_count() > 0
    assert not gc.isenabled()  # still starting: the probe settles it


def test_a_gc_someone_else_turned_off_stays_off():
    gc.disable()
    startup_gc.pause_gc(settle_after_s=None)
    assert startup_gc.settle_gc() is False and not gc.isenabled()


def test_a_pause_nobody_settles_ends_by_itself():
    startup_gc.pause_gc(settle_after_s=0.05)
    deadline = time.monotonic() + 5
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.isenabled()


def test_the_setup_hook_names_pause_gc_as_ray_loads_it():
    from ray._common.utils import load_class

    assert load_class(startup_gc.SETUP_HOOK) is startup_gc.pause_gc
