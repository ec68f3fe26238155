"""The tables of ``scripts/bench_pipeline.py``: one row per run, and the same runs by role.

Kept apart from the runner so each stays small; both read the per-run dicts ``run_one``
returns (``bench_pipeline`` documents the keys).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from process_tree import ROLES  # this directory: sys.path[0]


def trace_idle(run_dir: Path) -> dict[str, float]:
    """``rollout_idle`` / ``actor_idle`` from the run's ``timeline.json``: the workers' own
    calls, where the driver's timers count a sync that waits for a batch as the actor's work
    (one_step: "actor idle 0.02" against 43 % idle on the trace, run 36); {} without one."""
    from fipo_trainer.trainer.timeline_plot import idle_by_role, load_lanes

    trace = run_dir / "timeline.json"
    if not trace.is_file():
        return {}
    return idle_by_role(load_lanes(json.loads(trace.read_text()))) or {}


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def print_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    """A rich table, one row per run (refused / failed runs say why)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bench_pipeline (CPU)")
    cols = [
        "shape", "mode", "status", "steps", "s/step", "gen tok/s", "engine tok/s",
        "rollout idle", "actor idle", "wait s", "stale max", "val@0", "val@end",
        "start-up s", "start-up CPU-s", "to .45 s", "to .55 s", "RSS GiB", "PSS GiB", "busy cores", "procs",
        "wall s",
    ]  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c in ("shape", "mode", "status") else "right")
    for shape, modes in results.items():
        for mode, r in modes.items():
            mem, pss = r.get("peak_mem_bytes"), r.get("peak_pss_bytes")
            table.add_row(
                shape, mode, str(r.get("status")), _fmt(r.get("steps"), "d"),
                _fmt(r.get("s_per_step"), ".3f"), _fmt(r.get("gen_tokens_per_s"), ".0f"),
                _fmt(r.get("engine_tokens_per_s"), ".0f"), _fmt(r.get("rollout_idle")),
                _fmt(r.get("actor_idle")), _fmt(r.get("wait_batch_s"), ".3f"),
                _fmt(r.get("staleness_max"), ".0f"), _fmt(r.get("val_first"), ".3f"),
                _fmt(r.get("val_final"), ".3f"), _fmt(r.get("startup_s"), ".1f"),
                _fmt(r.get("startup_cpu_s"), ".1f"),
                _fmt(r.get("time_to_0.45_s"), ".0f"), _fmt(r.get("time_to_0.55_s"), ".0f"),
                _fmt(mem / 2**30 if mem else None), _fmt(pss / 2**30 if pss else None),
                _fmt(r.get("busy_cores")),
                _fmt(r.get("processes"), "d"), _fmt(r.get("wall_s"), ".0f"),
            )  # fmt: skip
    console = Console(width=max(200, shutil.get_terminal_size().columns))
    console.print(table)
    console.print(role_table(results))
    console.print(phase_table(results))
    for shape, modes in results.items():
        for mode, r in modes.items():
            if r.get("error"):
                console.print(f"{shape}/{mode} {r['status']}: {r['error']}", markup=False)


def role_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]):
    """Where the cores and the memory go, by role: busy cores between the first and the
    last step row (steady state, validations included) and PSS at the run's peak."""
    from rich.table import Table

    table = Table(title="by role: steady busy cores | PSS GiB at the peak")
    for c in (
        "shape",
        "mode",
        *(f"{r} cores" for r in ROLES),
        "all cores",
        *(f"{r} GiB" for r in ROLES),
    ):
        table.add_column(c, justify="left" if c in ("shape", "mode") else "right")
    for shape, modes in results.items():
        for mode, r in modes.items():
            busy = r.get("steady_busy_by_role") or {}
            pss = r.get("pss_by_role") or {}
            table.add_row(
                shape, mode, *(_fmt(busy.get(role)) for role in ROLES),
                _fmt(sum(busy.values()) if busy else None),
                *(_fmt(pss[role] / 2**30 if role in pss else None) for role in ROLES),
            )  # fmt: skip
    return table


def phase_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]):
    """Seconds and busy cores of each phase: the run's busy cores are their time-weighted
    mean, so this shows which phase holds the figure down."""
    from rich.table import Table

    table = Table(title="by phase: seconds | busy cores")
    names = ("start-up", "steps", "end")
    for c in ("shape", "mode", *(f"{n} s" for n in names), *(f"{n} cores" for n in names)):
        table.add_column(c, justify="left" if c in ("shape", "mode") else "right")
    for shape, modes in results.items():
        for mode, r in modes.items():
            ph = r.get("phases") or {}
            table.add_row(
                shape, mode, *(_fmt(ph.get(n, {}).get("s"), ".1f") for n in names),
                *(_fmt(ph.get(n, {}).get("busy_cores")) for n in names),
            )  # fmt: skip
    return table
