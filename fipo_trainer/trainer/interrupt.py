"""Ctrl-C during a run: kill the workers unasked (a stalled one would not answer) and say
where the run was waiting, in one line the CLI prints instead of a traceback. And for a run
that looks hung, or a Ctrl-C that does not stop it: where every driver thread is."""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from fipo_trainer.startup import STACKS_SIGNAL  # stdlib only

#: A Ctrl-C'd run is gone in a few seconds (the workers are killed unasked); one still
#: running after this long prints every thread's stack once, to show where it is stuck.
STOP_WITHIN_S = 10.0


@contextlib.contextmanager
def reporting_hangs(stop_within_s: float = STOP_WITHIN_S) -> Iterator[None]:
    """While the block runs, SIGUSR1 prints every thread's stack (no py-spy needed; a Ray
    worker of the run does the same, ``startup.setup_worker_process``), and so does a Ctrl-C
    that has not stopped the process within ``stop_within_s``. The previous handlers come
    back afterwards (a caller in the same process, pytest included, keeps its own); a report
    already due is left to fire, since the process may be stuck in its exit.

    Why faulthandler: it writes from its own C thread or the signal itself, so it answers
    even while the main thread is stuck in native code that never returns to Python.
    """
    out = stderr_with_fd()
    if out is None or threading.current_thread() is not threading.main_thread():
        yield  # nowhere faulthandler could write, or no signal handlers to set from here
        return

    def on_ctrl_c(signum: int, frame: Any) -> None:
        faulthandler.dump_traceback_later(stop_within_s, repeat=False, file=out)
        raise KeyboardInterrupt

    faulthandler.register(STACKS_SIGNAL, file=out, all_threads=True, chain=False)
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        faulthandler.unregister(STACKS_SIGNAL)


def stderr_with_fd() -> Any:
    """``sys.stderr``, or the process's own when it was replaced by one without a file
    descriptor (pytest's capture): faulthandler writes to the descriptor."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        return stream
    return None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; its workers were killed. The message says where it waited."""


def interrupted(trainer: Any, err: KeyboardInterrupt) -> TrainingInterrupted:
    """Kill ``trainer``'s workers after Ctrl-C and say so (on stderr, whatever logging is
    set up); the error to raise."""
    from fipo_trainer.cluster.waiting import interrupts_deferred

    start = time.monotonic()
    print("fipo-train: Ctrl-C: stopping the workers", file=sys.stderr, flush=True)
    with interrupts_deferred("still stopping the workers (a few seconds)"):
        trainer.shutdown(graceful=False)
    where = f" {err}" if str(err) else ""
    message = (
        f"interrupted (Ctrl-C){where}; workers stopped in {time.monotonic() - start:.1f}s. "
        f"Run directory: {trainer.run_dir}"
    )
    print(f"fipo-train: {message}", file=sys.stderr, flush=True)
    return TrainingInterrupted(message)
