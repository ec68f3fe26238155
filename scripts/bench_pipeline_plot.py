"""Curves of ``scripts/bench_pipeline.py`` runs in one PNG: validation against time, and
seconds per step with the generation rounds behind them.

Why: issue 11's quickstart targets are a time to accuracy (val mean@4 >= 0.55 within 150 s)
and a step time; a run misses or meets them by how its curve crosses the lines, which a
table's two numbers hide (a seed that gets to 0.54 and stalls reads like one that never
learns), and a step time that grows late in a run is dynamic sampling's extra rounds as
the policy sharpens (fewer groups keep a spread of rewards), drawn dotted on a right-hand
axis. Each run is one colour in both panels; the thresholds and the 150 s target are
drawn. ``bench_pipeline.py`` writes ``curves.png`` next to its ``results.json``; to compare
invocations (seeds, trees, VMs), overlay their results files:

    .venv/bin/python scripts/bench_pipeline_plot.py OUT_A/results.json OUT_B/results.json \\
        -o compare.png

Matplotlib through ``Figure`` only (no pyplot state), as ``fipo-plot`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

THRESHOLDS = (0.45, 0.55)  # bench_pipeline.THRESHOLDS
TARGET_S = 150.0  # issue 11: val mean@4 >= 0.55 within 150 s
SMOOTH_STEPS = 9  # the s/step panel: running median over this many steps

Results = Mapping[str, Mapping[str, Mapping[str, Any]]]


def running_median(values: Sequence[float], window: int) -> list[float]:
    """The median of each value's trailing ``window`` (fewer at the start)."""
    return [statistics.median(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value's trailing ``window`` (fewer at the start; NaNs skipped)."""
    out = []
    for i in range(len(values)):
        known = [v for v in values[max(0, i + 1 - window) : i + 1] if not math.isnan(v)]
        out.append(statistics.fmean(known) if known else math.nan)
    return out


def labelled_runs(results_by_name: Mapping[str, Results]) -> list[tuple[str, Mapping[str, Any]]]:
    """(legend label, run) for every run that has a curve; the name is left out when there
    is one results file."""
    out = []
    for name, results in results_by_name.items():
        for shape, modes in results.items():
            for mode, run in modes.items():
                if run.get("val_curve") or run.get("step_seconds"):
                    label = f"{shape}/{mode}"
                    out.append((f"{name}: {label}" if len(results_by_name) > 1 else label, run))
    return out


def label_axes(val_ax: Any, step_ax: Any, val_title: str) -> None:
    """The two panels' targets (0.45 / 0.55, 150 s), titles, axis names and grid."""
    for th in THRESHOLDS:
        val_ax.axhline(th, color="grey", linestyle="--", linewidth=0.8)
    val_ax.axvline(TARGET_S, color="grey", linestyle=":", linewidth=0.8)
    val_ax.set(title=val_title, xlabel="seconds since fipo-train started", ylabel="val mean@4")
    step_ax.set(title=f"Seconds per step (running median of {SMOOTH_STEPS})",
                xlabel="step", ylabel="s/step")  # fmt: skip
    for ax in (val_ax, step_ax):
        ax.grid(alpha=0.3)


def curves_figure(results_by_name: Mapping[str, Results], *, title: str = "bench_pipeline"):
    """The two-panel figure of every run in ``results_by_name`` (name -> results.json)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
    val_ax, step_ax = fig.subplots(1, 2)
    runs = labelled_runs(results_by_name)
    rounds_ax = None  # a right-hand axis, once a run has dynamic sampling's rounds
    for label, run in runs:
        curve = run.get("val_curve") or []
        line = val_ax.plot([t for t, _, _ in curve], [v for _, _, v in curve], marker="o",
                           markersize=3, label=label)[0]  # fmt: skip
        seconds = run.get("step_seconds") or []
        steps = [row[0] for row in seconds]
        step_ax.plot(steps, running_median([row[1] for row in seconds], SMOOTH_STEPS),
                     color=line.get_color(), label=label)  # fmt: skip
        rounds = [row[2] if len(row) > 2 and row[2] is not None else math.nan for row in seconds]
        if any(not math.isnan(r) for r in rounds):
            rounds_ax = rounds_ax or step_ax.twinx()
            rounds_ax.plot(steps, running_mean(rounds, SMOOTH_STEPS), color=line.get_color(),
                           linestyle=":", linewidth=1)  # fmt: skip
    label_axes(
        val_ax, step_ax, "Validation mean@4 against time (dashed: 0.45, 0.55; dotted: 150 s)"
    )
    if rounds_ax is not None:
        rounds_ax.set_ylabel(f"dotted: generation rounds per step (running mean of {SMOOTH_STEPS})")
    for ax in (val_ax, step_ax):
        if runs:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run with curves", ha="center", transform=ax.transAxes)
    fig.suptitle(title)
    return fig


def plot_curves(results_by_name: Mapping[str, Results], out_png: Path, **kwargs: Any) -> Path:
    """Write :func:`curves_figure` to ``out_png``; returns the path."""
    out_png.parent.mkdir(parents=True, exist_ok=True)
    curves_figure(results_by_name, **kwargs).savefig(out_png, format="png")
    return out_png


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="results.json files of bench_pipeline")
    p.add_argument("-o", "--out", type=Path, default=Path("bench_pipeline_curves.png"))
    args = p.parse_args(argv)
    loaded: dict[str, Results] = {}
    for path in args.results:
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            p.error(f"{path}: not a bench_pipeline results.json ({err})")
        name = path.parent.name if path.name == "results.json" else path.stem
        loaded[name if name not in loaded else str(path)] = results
    print(plot_curves(loaded, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
