"""fipo_trainer.startup: the GC paused while a process starts, the start-up heap frozen after;
on CPU, triton hidden from the workers."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from fipo_trainer import startup


@pytest.fixture(autouse=True)
def restore_gc():
    yield
    startup.settle_gc()
    gc.unfreeze()
    gc.enable()


def test_pause_then_settle_freezes_the_heap_and_turns_the_gc_back_on():
    gc.unfreeze()
    startup.pause_gc(settle_after_s=None)
    assert not gc.isenabled()
    garbage = [object() for _ in range(1000)]
    assert startup.settle_gc() is True
    assert gc.isenabled() and gc.get_freeze_count() >= len(garbage)
    assert startup.settle_gc() is False  # once only


def test_the_heap_is_frozen_early_only_while_starting():
    gc.unfreeze()
    assert startup.freeze_if_paused() is False and gc.get_freeze_count() == 0
    startup.pause_gc(settle_after_s=None)
    assert startup.freeze_if_paused() is True and gc.get_freeze_count() > 0
    assert not gc.isenabled()  # still starting: the probe settles it


def test_a_gc_someone_else_turned_off_stays_off():
    gc.disable()
    startup.pause_gc(settle_after_s=None)
    assert startup.settle_gc() is False and not gc.isenabled()


def test_a_pause_nobody_settles_ends_by_itself():
    startup.pause_gc(settle_after_s=0.05)
    deadline = time.monotonic() + 5
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.isenabled()


def test_the_setup_hook_resolves_as_ray_loads_it():
    from ray._common.utils import load_class

    assert load_class(startup.SETUP_HOOK) is startup.setup_worker_process


_PROBE = """
import gc, importlib.util, json, sys
from fipo_trainer import startup
{before}
done = startup.{call}
import torch._dynamo  # transformers imports it in every actor rank; it imports triton
print(json.dumps({{"done": done, "gc": gc.isenabled(), "triton": repr(sys.modules.get("triton")),
                  "spec": importlib.util.find_spec("triton") is not None}}))
"""


def _probe(call: str, env: dict[str, str], before: str = "") -> dict[str, object]:
    """Runs in a fresh interpreter: hiding a package is for the whole process."""
    environ = {k: v for k, v in os.environ.items() if k != startup.HIDE_TRITON_ENV} | env
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(call=call, before=before)],
        env=environ, capture_output=True, text=True, check=True, timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_triton_is_hidden_only_when_asked():
    hidden = _probe("hide_triton()", {startup.HIDE_TRITON_ENV: "1"})
    assert hidden == {"done": True, "gc": True, "triton": "None", "spec": False}
    for env in ({}, {startup.HIDE_TRITON_ENV: "0"}):
        kept = _probe("hide_triton()", env)
        assert kept["done"] is False and kept["spec"] is True
        assert kept["triton"].startswith("<module 'triton'")  # torch._dynamo loaded it


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_a_process_that_loaded_triton_keeps_it():
    out = _probe("hide_triton()", {startup.HIDE_TRITON_ENV: "1"}, before="import triton")
    assert out["done"] is False and out["triton"].startswith("<module 'triton'")


def test_the_worker_hook_pauses_the_gc_and_hides_triton():
    out = _probe("setup_worker_process()", {startup.HIDE_TRITON_ENV: "1"})
    assert out["gc"] is False and out["triton"] == "None" and out["spec"] is False


def test_cpu_workers_are_asked_to_hide_triton_and_a_users_0_wins(monkeypatch):
    from fipo_trainer import platform

    monkeypatch.setenv("FIPO_FORCE_CPU", "1")
    monkeypatch.delenv(startup.HIDE_TRITON_ENV, raising=False)
    assert platform.worker_env()[startup.HIDE_TRITON_ENV] == "1"
    monkeypatch.setenv(startup.HIDE_TRITON_ENV, "0")
    assert platform.worker_env()[startup.HIDE_TRITON_ENV] == "0"


def test_cpu_workers_keep_few_onednn_primitives_and_a_users_value_wins(monkeypatch):
    from fipo_trainer import platform

    monkeypatch.setenv("FIPO_FORCE_CPU", "1")
    monkeypatch.delenv(platform.ONEDNN_CACHE_ENV, raising=False)
    assert platform.worker_env()["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"
    monkeypatch.setenv(platform.ONEDNN_CACHE_ENV, "1024")
    assert platform.worker_env()["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"


def test_the_heap_stays_frozen_while_a_process_that_exits_next_stops_its_engine():
    gc.unfreeze()
    unfreeze = gc.unfreeze
    with startup.heap_stays_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        gc.unfreeze()  # what vLLM's engine shutdown calls before its full collections
        assert gc.get_freeze_count() == frozen
    assert gc.unfreeze is unfreeze
    gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_gc_unfreeze_comes_back_when_the_shutdown_fails():
    unfreeze = gc.unfreeze
    with pytest.raises(RuntimeError), startup.heap_stays_frozen():
        raise RuntimeError("engine failed to stop")
    assert gc.unfreeze is unfreeze
