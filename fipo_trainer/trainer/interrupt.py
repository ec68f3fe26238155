"""Ctrl-C during a run: kill the workers unasked (a stalled one would not answer) and say
where the run was waiting, in one line the CLI prints instead of a traceback. And for a run
that looks hung, or a Ctrl-C that does not stop it: where every driver thread is."""

from __future__ import annotations

import faulthandler
import signal
import sys
import time
from typing import Any

#: ``kill -USR1 <pid of fipo-train>``: every thread's stack on stderr; the run goes on.
STACKS_SIGNAL = signal.SIGUSR1
#: A Ctrl-C'd run is gone in a few seconds (the workers are killed unasked); one still
#: running after this long prints every thread's stack once, to show where it is stuck.
STOP_WITHIN_S = 10.0


def report_hangs(stop_within_s: float = STOP_WITHIN_S) -> None:
    """SIGUSR1 prints every thread's stack (no py-spy needed; the workers have ``ray stack``),
    and so does a Ctrl-C that has not stopped the process within ``stop_within_s``.

    Why faulthandler: it writes from its own C thread or the signal itself, so it answers
    even while the main thread is stuck in native code that never returns to Python.
    """
    faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True, chain=False)

    def on_ctrl_c(signum: int, frame: Any) -> None:
        faulthandler.dump_traceback_later(stop_within_s, repeat=False, file=sys.stderr)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)


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
