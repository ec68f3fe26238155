"""Grader worker processes: how one is started, watched and stopped.

Why apart from the pool: starting a fresh interpreter (``python -m
fipo_trainer.rewards._worker FD``, never a fork), handing it a socket and the config, and
killing its whole process group are process plumbing; the pool only schedules items on the
handles this module gives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from .config import RewardConfig

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class _Worker:
    """One grader process: its socket, its pidfd sentinel and the chunk it is grading."""

    __slots__ = (
        "conn",
        "fatal",
        "item_started",
        "pos",
        "proc",
        "ready",
        "sentinel",
        "started_at",
        "task",
    )

    def __init__(self, proc: subprocess.Popen, conn: Connection, sentinel: int | None) -> None:
        self.proc = proc
        self.conn = conn
        self.sentinel = sentinel  # pidfd: readable once the process has exited
        self.ready = False
        self.fatal: str | None = None
        self.task: list[tuple] | None = None
        self.pos = 0
        self.started_at = time.monotonic()
        self.item_started = 0.0

    @property
    def handles(self) -> list:
        return [self.conn] if self.sentinel is None else [self.conn, self.sentinel]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def release(self, *, kill: bool) -> None:
        if kill and self.alive():
            try:  # the worker leads its own process group: take its children down too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.conn.close()
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None


def _stop_workers(workers: list[_Worker], graceful: bool = True) -> None:
    for w in workers if graceful else ():
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(None)
    deadline = time.monotonic() + (2.0 if graceful else 0.0)
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        w.release(kill=True)
    workers.clear()


def spawn_worker(config: RewardConfig, expected: frozenset[str]) -> _Worker:
    """Start one grader process and send it ``config`` and the graders it imports and warms
    up before it reports ready (its first message)."""
    parent_sock, child_sock = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    fd = child_sock.fileno()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fipo_trainer.rewards._worker", str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    finally:
        child_sock.close()
    conn = Connection(parent_sock.detach())
    sentinel = None
    with contextlib.suppress(AttributeError, OSError):  # pidfd: Linux >= 5.3
        sentinel = os.pidfd_open(proc.pid)
    with contextlib.suppress(OSError):  # died at once: the pool's drain sees it and reports
        conn.send((config, expected))
    return _Worker(proc, conn, sentinel)
