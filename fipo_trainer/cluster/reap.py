"""After ``ray.kill``, make sure a group's worker processes on this machine are gone.

Why: ``ray.kill`` only asks Ray to stop an actor. A worker that does not answer (stopped
with SIGSTOP, stuck in native code) is force-killed by its raylet some time later, but a
driver that exits right away (Ctrl-C, a stalled worker's timeout) takes its local raylet down
first, and the stopped process stays behind forever. So the driver waits a moment for the
worker processes it can see and kills whatever is left itself. A pid only counts as the
worker if it runs on the driver's node (hostname and node IP), its start time matches and
its title is the worker's (``ray::<Class>``): pids are reused, hostnames can repeat.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from fipo_trainer.cluster.leftovers import START_TIME_SLACK_S  # psutil's 1.0 s jitter

logger = logging.getLogger(__name__)

#: How long killed workers get to exit on their own before the driver SIGKILLs them.
GRACE_S = 3.0


@dataclass(frozen=True)
class LocalProcess:
    """A worker process on the driver's machine: its pid and start time."""

    pid: int
    create_time: float
    title: str

    @classmethod
    def of(cls, info: Mapping[str, Any], worker_cls: type) -> LocalProcess | None:
        """From a worker's ``health()`` answer; None unless it runs on this node."""
        from fipo_trainer.cluster.worker import node_ip

        if info.get("host") != socket.gethostname() or info.get("node_ip") != node_ip():
            return None
        try:
            proc = psutil.Process(int(info["pid"]))
            found = cls(proc.pid, proc.create_time(), f"ray::{worker_cls.__name__}")
        except (psutil.Error, KeyError, TypeError, ValueError):
            return None
        return found if found.running() else None

    def running(self) -> bool:
        """Whether the worker's process still runs (same pid, start time and title)."""
        try:
            proc = psutil.Process(self.pid)
            return (
                abs(proc.create_time() - self.create_time) < START_TIME_SLACK_S
                and proc.status() != psutil.STATUS_ZOMBIE
                and " ".join(proc.cmdline()).startswith(self.title)
            )
        except psutil.Error:
            return False

    def stopped(self) -> bool:
        """Whether it is stopped (SIGSTOP, a debugger): it will not exit until killed."""
        try:
            status = psutil.Process(self.pid).status()
        except psutil.Error:
            return False
        return self.running() and status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)


def reap(procs: Sequence[LocalProcess], grace_s: float = GRACE_S) -> list[int]:
    """Wait up to ``grace_s`` for ``procs`` to exit, then SIGKILL the rest. A stopped process
    (SIGSTOP) cannot exit on its own, so it gets no grace: it dies of SIGKILL at once (Ctrl-C
    of a run with a stopped worker ends seconds sooner). Returns the pids killed here."""
    deadline = time.monotonic() + grace_s
    left = [p for p in procs if p.running()]
    killed = _kill([p for p in left if p.stopped()])
    left = [p for p in left if p.pid not in killed]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if p.running()]
    killed += _kill(left)
    if killed:
        logger.warning(
            "worker process(es) %s did not exit %.0fs after ray.kill (or were stopped); "
            "killed them",
            killed,
            grace_s,
        )
    return killed


def _kill(procs: Sequence[LocalProcess]) -> list[int]:
    killed = []
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return killed
