"""``fipo-plot --compare RUN_DIR...``: several runs' curves overlaid, one colour per run.

Why: an ablation is read by putting its runs side by side (FIPO vs DAPO, filter on/off).
Each panel of :data:`plot.PANELS` shows one metric (the panel's first, e.g. ``val/mean@4``,
``actor/influence_weights_mean``), and each run or group of runs one line. A run is named by
its Hydra overrides (``.hydra/overrides.yaml``, written in every run dir; else the dir
name), keeping only the overrides that differ between the runs. Runs whose overrides differ
only in a seed (any key ending in ``seed``: ``trainer.seed``, ``data.seed``, ...) are one
group: their mean is the line, their min–max the band. Matplotlib through ``Figure`` only,
as in :mod:`fipo_trainer.trainer.plot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fipo_trainer.trainer.plot import PANELS, Panel, _match, load_series
from fipo_trainer.trainer.tracking import METRICS_FILE

__all__ = [
    "Group",
    "RunCurves",
    "compare_figure",
    "compare_main",
    "group_runs",
    "is_seed_override",
    "load_runs",
    "plot_compare",
    "run_overrides",
]

DEFAULT_COMPARE_PNG = "compare.png"
Series = dict[str, tuple[list[int], list[float]]]


@dataclass
class RunCurves:
    """One run directory: its overrides and its metric series."""

    run_dir: Path
    overrides: list[str]
    series: Series


@dataclass
class Group:
    """Runs with the same overrides but the seed; ``label`` is the legend entry."""

    key: tuple[str, ...]
    runs: list[RunCurves] = field(default_factory=list)
    label: str = ""


def run_overrides(run_dir: str | Path) -> list[str]:
    """The run's Hydra overrides (``.hydra/overrides.yaml``); [] when it has none."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    loaded = OmegaConf.to_container(OmegaConf.load(path))
    return [str(o) for o in loaded] if isinstance(loaded, list) else []


def load_runs(paths: Sequence[str | Path]) -> list[RunCurves]:
    """Each path is a run directory (or its metrics.jsonl); a missing file is an error."""
    runs = []
    for path in map(Path, paths):
        run_dir = path.parent if path.is_file() else path
        metrics = run_dir / METRICS_FILE
        if not metrics.is_file():
            raise FileNotFoundError(f"{metrics} does not exist; pass run directories")
        runs.append(RunCurves(run_dir, run_overrides(run_dir), load_series(metrics)))
    return runs


def is_seed_override(override: str) -> bool:
    """``trainer.seed=1``, ``data.seed=3``, ``model.tiny.seed=0``: a seed, not a setting."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.rsplit(".", 1)[-1] == "seed"


def group_runs(runs: Sequence[RunCurves]) -> list[Group]:
    """Runs grouped by their non-seed overrides (in order of first appearance), labelled by
    the overrides that tell the groups apart (a run without overrides: its dir name)."""
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        if run.overrides:
            key = tuple(sorted(o for o in run.overrides if not is_seed_override(o)))
        else:
            key = (f"dir:{run.run_dir.resolve()}",)
        groups.setdefault(key, Group(key)).runs.append(run)
    found = list(groups.values())
    common = set.intersection(*(set(g.key) for g in found)) if found else set()
    for group in found:
        if group.key[0].startswith("dir:"):
            text = group.runs[0].run_dir.name
        else:
            text = " ".join(o for o in group.key if o not in common) or group.runs[0].run_dir.name
        seeds = len(group.runs)
        group.label = f"{text} ({seeds} seeds)" if seeds > 1 else text
    return found


def _metric(panel: Panel, keys: Sequence[str]) -> str | None:
    """The panel's metric: its first present key with the fewest levels (``val/mean@4``,
    not ``val/arithmetic/mean@4``)."""
    found = _match(panel.keys, keys)
    return min(found, key=lambda k: k.count("/")) if found else None


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1: unchanged)."""
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _band(runs: Sequence[RunCurves], key: str, window: int) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the runs that logged ``key`` at each step."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        if key in run.series:
            steps, values = run.series[key]
            for step, value in zip(steps, _smooth(values, window)):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        [min(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def _compare_panel(ax: Any, panel: Panel, groups: Sequence[Group], smooth: int) -> None:
    keys = sorted({k for g in groups for r in g.runs for k in r.series})
    key = _metric(panel, keys)
    ax.set_title(f"{panel.title}: {key}" if key else panel.title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if key is None:
        ax.text(0.5, 0.5, f"no data\n(expected {', '.join(panel.keys)})", ha="center",
                va="center", fontsize=7, color="gray", wrap=True, transform=ax.transAxes)
        return
    window = 1 if key.startswith("val/") else smooth  # validation points are few
    for i, group in enumerate(groups):
        steps, mean, low, high = _band(group.runs, key, window)
        if not steps:
            continue
        color = f"C{i % 10}"
        ax.plot(steps, mean, "-", color=color, label=group.label,
                marker="o" if len(steps) < 30 else None, markersize=3)
        if len(group.runs) > 1:
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    if ax.get_lines():
        ax.legend(fontsize=7, loc="best")


def compare_figure(runs: Sequence[RunCurves], *, title: str | None = None, smooth: int = 1) -> Any:
    """The comparison :class:`matplotlib.figure.Figure` (one axes per panel)."""
    from matplotlib.figure import Figure

    groups = group_runs(runs)
    fig = Figure(figsize=(12, 11), dpi=100, layout="constrained")
    axes = fig.subplots(3, 2).flatten()
    for ax, panel in zip(axes, PANELS):
        _compare_panel(ax, panel, groups, smooth)
    note = f", training curves smoothed over {smooth} steps" if smooth > 1 else ""
    fig.suptitle(title or f"{len(runs)} runs in {len(groups)} groups (line: mean, band: "
                 f"min–max over seeds){note}", fontsize=11)
    return fig


def plot_compare(
    paths: Sequence[str | Path], out_png: str | Path, *, title: str | None = None, smooth: int = 1
) -> Path:
    """Draw the comparison of ``paths`` (run dirs) into ``out_png``; returns its path."""
    fig = compare_figure(load_runs(paths), title=title, smooth=smooth)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def compare_main(paths: Sequence[Path], out: Path | None, smooth: int = 1) -> int:
    """``fipo-plot --compare``: the PNG goes to ``out`` or the runs' common parent."""
    import os

    if out is None:
        parent = Path(os.path.commonpath([p.resolve() for p in paths]))
        out = (parent if len(paths) > 1 else parent.parent) / DEFAULT_COMPARE_PNG
    print(plot_compare(paths, out, smooth=smooth))
    return 0
