"""Where a stalled worker is: its Python stacks, added to the error that names it.

Why: a call that misses its deadline names the role, rank and call; where the worker is stuck
(a collective that never completes, a native call that never returns, a loop) is the next
question, and by the time someone asks, the run's workers are gone. Every Ray worker of a
run prints its stacks on SIGUSR1 (``startup.setup_worker_process`` registers faulthandler,
which answers even while Python is stuck in native code); Ray writes a worker's stderr to
``worker-*-<pid>.err`` in the session's log directory. So the driver signals the stalled
ranks' processes on its own machine and reads what they wrote. A stopped process (SIGSTOP)
or one on another node has nothing to add; one without the handler is never signalled
(SIGUSR1 would end it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from fipo_trainer.startup import STACKS_SIGNAL

E = TypeVar("E", bound=BaseException)

END_OF_DUMP = "most recent call first"
MAX_LINES = 40  # per rank: the main thread and the first few others


def catches(pid: int, signum: int = STACKS_SIGNAL) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (``SigCgt`` in its status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def ray_logs_dir() -> Path | None:
    """This Ray session's log directory on this machine (None without a local Ray node)."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public accessor
        return Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:
        return None


def stacks_of(pids: Sequence[int], logs_dir: Path, wait_s: float = 2.0) -> dict[int, str]:
    """What each of ``pids`` printed on SIGUSR1 (its Ray ``.err`` log's new part); pids that
    printed nothing within ``wait_s`` are left out."""
    logs = {}
    for pid in pids:
        found = sorted(logs_dir.glob(f"worker-*-{pid}.err"), key=lambda p: p.stat().st_mtime)
        if found and catches(pid):
            logs[pid] = (found[-1], found[-1].stat().st_size)
    for pid in logs:
        try:
            os.kill(pid, STACKS_SIGNAL)
        except OSError:
            continue
    out: dict[int, str] = {}
    seen: dict[int, str] = {}
    deadline = time.monotonic() + wait_s
    while len(out) < len(logs) and time.monotonic() < deadline:
        time.sleep(0.1)
        for pid, (path, start) in logs.items():
            with open(path, errors="replace") as f:
                f.seek(start)
                text = f.read()
            if END_OF_DUMP in text and text == seen.get(pid):  # written and no longer growing
                out[pid] = main_thread_first(text)
            seen[pid] = text
    return out


def main_thread_first(dump: str, max_lines: int = MAX_LINES) -> str:
    """A faulthandler dump with the main thread first: it runs a (synchronous) actor's calls.

    faulthandler lists the newest thread first, so the main thread comes last; its "Current
    thread" only marks the thread the signal happened to land on (often one of Ray's).
    """
    blocks = [b.strip() for b in dump.strip().split("\n\n") if b.strip()]
    lines = "\n\n".join(blocks[-1:] + blocks[:-1]).splitlines()
    return "\n".join(lines[:max_lines] + (["  ..."] if len(lines) > max_lines else []))


def add_stacks(err: E, pids_by_rank: Mapping[int, int], label: str) -> E:
    """``err`` (a ``CallTimeoutError``: ``ranks`` are the stalled ones) with those ranks'
    stacks appended to its message, where any could be read; ``label`` names the group."""
    ranks = [r for r in getattr(err, "ranks", []) if r in pids_by_rank]
    logs_dir = ray_logs_dir() if ranks else None
    if logs_dir is None:
        return err
    stacks = stacks_of([pids_by_rank[r] for r in ranks], logs_dir)
    parts = [f"{label} rank {r} (pid {pids_by_rank[r]}) is here:\n{stacks[pids_by_rank[r]]}"
             for r in ranks if pids_by_rank[r] in stacks]  # fmt: skip
    if parts:
        err.args = (f"{err.args[0] if err.args else err}\n" + "\n".join(parts), *err.args[1:])
    return err
