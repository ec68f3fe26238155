"""Ctrl-C during a run: kill the workers unasked (a stalled one would not answer) and say
where the run was waiting, in one line the CLI prints instead of a traceback."""

from __future__ import annotations

import sys
import time
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; its workers were killed. The message says where it waited."""


def interrupted(trainer: Any, err: KeyboardInterrupt) -> TrainingInterrupted:
    """Kill ``trainer``'s workers after Ctrl-C and say so (on stderr, whatever logging is
    set up); the error to raise."""
    from fipo_trainer.cluster.waiting import interrupts_deferred

    start = time.monotonic()
    with interrupts_deferred("still stopping the workers (a few seconds)"):
        trainer.shutdown(graceful=False)
    where = f" {err}" if str(err) else ""
    message = (
        f"interrupted (Ctrl-C){where}; workers stopped in {time.monotonic() - start:.1f}s. "
        f"Run directory: {trainer.run_dir}"
    )
    print(f"fipo-train: {message}", file=sys.stderr, flush=True)
    return TrainingInterrupted(message)
