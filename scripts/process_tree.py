"""Sampling a run's process tree for the benchmarks: memory and CPU, in total and by role.

Why by role: a summed figure ("2.35 GiB", "1.5 busy cores") says whether a target is met,
not which process to work on. Roles come from the process titles Ray and the trainer set:
the tree's root is the driver, ``ray::RolloutWorker`` the rollout engine, ``ray::*ActorWorker``
an actor rank, ``fipo_trainer.rewards`` the grader; everything else (GCS, raylet, dashboard,
agents, monitors, idle workers) is Ray's helpers. A Ray worker is titled ``ray::IDLE`` until
its actor lands, so a process keeps the most specific role it was ever seen with.

RSS counts a page shared by N processes (torch's libraries, say) N times; PSS charges each
process 1/N of it, so summed PSS is the memory the run really holds.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

ROLES = ("driver", "rollout", "actor", "grader", "ray")
_TITLES = (
    ("RolloutWorker", "rollout"),
    ("ActorWorker", "actor"),
    ("fipo_trainer.rewards", "grader"),
)


def role_of(cmdline: str, is_root: bool = False) -> str:
    """The role of a process from its command line (``ray`` when nothing else matches)."""
    if is_root:
        return "driver"
    return next((role for title, role in _TITLES if title in cmdline), "ray")


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (Linux ``smaps_rollup``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def busy_seconds(stat_line: str, ticks_per_s: float) -> float:
    """CPU seconds spent busy by every core, from ``/proc/stat``'s first (``cpu``) line:
    every state but idle and iowait (guest time is already inside user/nice)."""
    fields = [int(v) for v in stat_line.split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    counted = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return (counted - idle) / ticks_per_s


class MachineCpu:
    """The machine's busy CPU seconds since construction, less this process's own.

    Why beside the tree's sampled figure: the sampler sees a process's CPU time up to its
    last sample, so what a process spends in its last half second before it exits (the
    run's shut-down), and processes that live less than a sample, are missed; the machine's
    counters miss nothing, and count whatever else runs (so: a quiet machine).
    """

    def __init__(self) -> None:
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._start = self._busy() - self._own()

    def _busy(self) -> float:
        with open("/proc/stat", encoding="ascii") as f:
            return busy_seconds(f.readline(), self._ticks)

    @staticmethod
    def _own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def seconds(self) -> float:
        """Busy CPU seconds of everything but this process since construction."""
        return self._busy() - self._own() - self._start


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds per process (keyed by pid and start time) at monotonic time ``t``."""

    t: float
    cpu: Mapping[tuple[int, float], float] = field(default_factory=dict)


class TreeMonitor:
    """Samples a process tree: summed RSS and PSS (peaks, and PSS by role at its peak) and
    CPU time per process (last value, so processes that exited still count)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.cpu: dict[tuple[int, float], float] = {}
        self.roles: dict[tuple[int, float], str] = {}
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_pss_by_role: dict[str, int] = {}
        self.max_procs = 0

    def sample(self) -> None:
        """One look at every process in the tree."""
        ps = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        rss = pss = 0
        by_role: dict[str, int] = {}
        for p in procs:
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    self.cpu[key] = t.user + t.system
                    rss += p.memory_info().rss
                    self._note_role(key, p)
                own = pss_bytes(p.pid)
            except ps.Error:
                continue
            pss += own
            role = self.roles[key]
            by_role[role] = by_role.get(role, 0) + own
        self.peak_rss = max(self.peak_rss, rss)
        if pss > self.peak_pss:
            self.peak_pss, self.peak_pss_by_role = pss, by_role
        self.max_procs = max(self.max_procs, len(procs))

    def _note_role(self, key: tuple[int, float], proc) -> None:
        if self.roles.get(key, "ray") != "ray":
            return  # already known: a role, once seen, stays
        try:
            cmdline = " ".join(proc.cmdline())
        except self._psutil.Error:
            cmdline = ""
        self.roles[key] = role_of(cmdline, is_root=proc.pid == self.root.pid)

    def snapshot(self) -> CpuSnapshot:
        """The CPU seconds sampled so far, stamped now (for :meth:`busy_by_role`)."""
        return CpuSnapshot(time.monotonic(), dict(self.cpu))

    def busy_by_role(self, start: CpuSnapshot, end: CpuSnapshot) -> dict[str, float]:
        """Busy cores of each role between two snapshots (CPU seconds / wall seconds); a
        process started after ``start`` counts from zero."""
        wall = end.t - start.t
        if wall <= 0:
            return {}
        busy = dict.fromkeys(ROLES, 0.0)
        for key, seconds in end.cpu.items():
            busy[self.roles.get(key, "ray")] += max(0.0, seconds - start.cpu.get(key, 0.0)) / wall
        return busy

    def pids(self) -> list[int]:
        return [pid for pid, _ in self.cpu]


def busy_by_phase(
    start: float,
    first: CpuSnapshot | None,
    last: CpuSnapshot | None,
    end: float,
    tree_cpu_s: float,
) -> dict[str, dict[str, float]] | None:
    """Seconds and busy cores of the run's three phases: ``start-up`` (process start to the
    first step row: step 1 and the first validation included), ``steps`` (first to last step
    row) and ``end`` (last step row to exit: checkpoint, export, shut-down, plots).

    Why: the run's figure is their time-weighted mean, so a phase below the target pulls it
    down however busy the steps are; this says which one and by how much. The end's CPU is
    what the tree's samples saw: a process's last half second before it exits is missed
    (the machine's figure counts it)."""
    if first is None or last is None:
        return None
    bounds = [
        ("start-up", start, first.t, 0.0, sum(first.cpu.values())),
        ("steps", first.t, last.t, sum(first.cpu.values()), sum(last.cpu.values())),
        ("end", last.t, end, sum(last.cpu.values()), tree_cpu_s),
    ]
    return {
        name: {"s": t1 - t0, "busy_cores": (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0}
        for name, t0, t1, c0, c1 in bounds
    }
