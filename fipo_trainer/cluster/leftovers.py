"""A run directory's record of the local Ray session it started, to report orphans.

Why: when the driver is SIGKILLed (OOM killer, ``kill -9``, a lost terminal) the GCS and
raylet die with it, but Ray's agents (dashboard agent, runtime-env agent) notice only when
their next liveness check of the raylet fails — up to about a minute later — and a worker
blocked in native code may linger longer. Nothing tells the user. So a local start writes
``run_dir/ray_session.json`` (session dir, GCS address, the pids of the session's
processes); the next start in the same run directory reads it and, if any of those
processes still runs, logs a warning naming them and the exact ``kill`` command
(``ray stop`` would stop every Ray of this user, other runs included). A clean shutdown
removes the record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

RECORD_NAME = "ray_session.json"
# A pid is only "the same process" if its start time matches too (pids are reused). The
# start time psutil reports is the kernel's boot time, in whole seconds, plus the ticks since
# boot: when the wall clock is slewed the boot time can tick over by one between two reads, so
# the same process reads 1.0 s apart (a flaky CI failure, 2026-12-03). More than that is a
# different process.
START_TIME_SLACK_S = 2.5


@dataclass(frozen=True)
class ProcessEntry:
    """One process of the session, as recorded."""

    pid: int
    name: str
    create_time: float

    @classmethod
    def of(cls, proc: psutil.Process) -> ProcessEntry:
        return cls(pid=proc.pid, name=_title(proc), create_time=proc.create_time())

    def running(self) -> psutil.Process | None:
        """The process if it still runs (same pid *and* start time), else None."""
        try:
            proc = psutil.Process(self.pid)
            same = abs(proc.create_time() - self.create_time) < START_TIME_SLACK_S
            return proc if same and proc.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None


@dataclass(frozen=True)
class SessionRecord:
    """What a run directory remembers about the local Ray session that served it."""

    driver: ProcessEntry
    session_dir: str
    gcs_address: str
    node_ip: str
    started_at: float
    processes: list[ProcessEntry] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SessionRecord:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            driver=ProcessEntry(**raw["driver"]),
            session_dir=str(raw["session_dir"]),
            gcs_address=str(raw["gcs_address"]),
            node_ip=str(raw["node_ip"]),
            started_at=float(raw["started_at"]),
            processes=[ProcessEntry(**p) for p in raw.get("processes", [])],
        )

    def is_this_process(self) -> bool:
        me = psutil.Process()
        return self.driver.pid == me.pid and self.driver.running() is not None


def _title(proc: psutil.Process) -> str:
    """``ray::DashboardAgent``-style titles are in the command line, not in ``name()``."""
    with contextlib.suppress(psutil.Error):
        cmd = proc.cmdline()
        if cmd and cmd[0].startswith("ray::"):
            return cmd[0].strip()
        return proc.name()
    return "?"


def record_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / RECORD_NAME


def session_processes(driver: psutil.Process | None = None) -> list[psutil.Process]:
    """The processes a local ``ray.init`` started: the driver's descendants (GCS, raylet,
    monitor, log monitor, the raylet's agents and workers)."""
    driver = driver or psutil.Process()
    with contextlib.suppress(psutil.Error):
        return driver.children(recursive=True)
    return []


def write_record(
    run_dir: str | os.PathLike[str],
    *,
    session_dir: str,
    gcs_address: str,
    node_ip: str,
    processes: list[psutil.Process] | None = None,
) -> Path:
    """Write (atomically) the record of the session this process just started."""
    entries = []
    for proc in session_processes() if processes is None else processes:
        with contextlib.suppress(psutil.Error):
            entries.append(ProcessEntry.of(proc))
    record = SessionRecord(
        driver=ProcessEntry.of(psutil.Process()),
        session_dir=session_dir,
        gcs_address=gcs_address,
        node_ip=node_ip,
        started_at=time.time(),
        processes=entries,
    )
    path = record_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.to_json())
    os.replace(tmp, path)
    return path


def read_record(run_dir: str | os.PathLike[str]) -> SessionRecord | None:
    """The recorded session, or None (no record, or one that cannot be read)."""
    path = record_path(run_dir)
    try:
        return SessionRecord.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable Ray session record %s: %s", path, exc)
        return None


def remove_record(run_dir: str | os.PathLike[str], *, only_ours: bool = True) -> bool:
    """Delete the record (by default only if this process wrote it); True if removed."""
    path = record_path(run_dir)
    record = read_record(run_dir)
    if record is None and not path.exists():
        return False
    if only_ours and record is not None and not record.is_this_process():
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False


def running_leftovers(record: SessionRecord) -> list[psutil.Process]:
    """Recorded processes that still run, plus their children (workers they started)."""
    found: dict[int, psutil.Process] = {}
    for entry in record.processes:
        proc = entry.running()
        if proc is None:
            continue
        found[proc.pid] = proc
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    found.pop(os.getpid(), None)
    return [found[pid] for pid in sorted(found)]


def report_leftovers(run_dir: str | os.PathLike[str]) -> list[int]:
    """Warn about a previous run's Ray processes still running; returns their pids.

    A record whose processes are all gone is stale and removed silently. A record of this
    very process (Ray reused in-process) is not a leftover.
    """
    record = read_record(run_dir)
    if record is None or record.is_this_process():
        return []
    path = record_path(run_dir)
    driver_alive = record.driver.running() is not None
    procs = running_leftovers(record)
    if not procs and not driver_alive:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return []
    pids = [p.pid for p in procs]
    listed = ", ".join(f"{p.pid} ({_title(p)})" for p in procs) or "none besides the driver"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started_at))
    if driver_alive:
        logger.warning(
            "run directory %s is also used by a running driver (pid %d, Ray session %s, "
            "started %s); two runs writing one run directory overwrite each other's metrics "
            "and checkpoints. Its Ray processes: %s",
            Path(run_dir),
            record.driver.pid,
            record.session_dir,
            started,
            listed,
        )
    else:
        logger.warning(
            "a previous run in %s (driver pid %d, gone; Ray session %s at %s, started %s) left "
            "%d Ray process(es) running: %s. Ray's agents exit by themselves within about a "
            "minute of their raylet's death; to stop them now: kill %s (`ray stop` would stop "
            "every Ray cluster of this user, other runs included)",
            Path(run_dir),
            record.driver.pid,
            record.session_dir,
            record.gcs_address,
            started,
            len(procs),
            listed,
            " ".join(map(str, pids)),
        )
    return pids
