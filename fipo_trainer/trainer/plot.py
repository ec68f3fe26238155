"""Training curves from a run's ``metrics.jsonl`` to one PNG (``fipo-plot``).

Why: the jsonl file is always there, even without tensorboard or wandb, and a single
picture of reward, validation accuracy, length, influence weights, clipping and entropy/KL
is what one checks first after a run (entropy collapse, length blow-up, FIPO weights stuck
at 1). Panels whose metrics are absent (e.g. influence weights under DAPO) are drawn empty
with a note instead of failing. Matplotlib is used through ``Figure`` directly, so the
caller's pyplot backend and global state are never touched.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fipo_trainer.trainer.tracking import METRICS_FILE, read_metrics

__all__ = ["PANELS", "Panel", "load_series", "main", "plot_run"]

DEFAULT_PNG = "curves.png"


@dataclass(frozen=True)
class Panel:
    """One subplot: metric keys or fnmatch patterns; ``secondary`` ones use a right-hand axis."""

    title: str
    keys: tuple[str, ...]
    secondary: tuple[str, ...] = ()
    ylabel: str = ""
    secondary_ylabel: str = ""


PANELS: tuple[Panel, ...] = (
    Panel("Training reward / accuracy", ("reward/score_mean", "reward/acc_mean"), ylabel="mean over responses"),
    Panel("Validation accuracy", ("val/*mean@*",), ylabel="mean@k"),
    Panel(
        "Response length",
        (
            "rollout/response_length_mean",
            "rollout/response_length_max",
            "response_length/mean",
            "response_length/max",
        ),
        ylabel="tokens",
    ),
    Panel(
        "Influence weights",
        ("actor/influence_weights_mean", "actor/influence_weights_min", "actor/influence_weights_max"),
    ),
    Panel("Clip fractions", ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/IW_*_clip_ratio")),
    Panel("Entropy / KL", ("actor/entropy",), secondary=("actor/ppo_kl",), ylabel="entropy", secondary_ylabel="ppo_kl"),
)


def load_series(metrics_jsonl: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` with finite values only; repeated steps merge (last wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_metrics(metrics_jsonl):
        by_step.setdefault(row["step"], {}).update(row)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def _match(patterns: Sequence[str], keys: Sequence[str]) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        for key in sorted(fnmatch.filter(keys, pattern)):
            if key not in found:
                found.append(key)
    return found


def _draw(ax: Any, keys: list[str], series: dict, style: str, first_color: int = 0) -> list:
    lines = []
    for i, key in enumerate(keys):
        steps, values = series[key]
        sparse = len(steps) < 30  # few points (validation, short runs): show markers
        lines += ax.plot(steps, values, style, color=f"C{(first_color + i) % 10}",
                         marker="o" if sparse else None, markersize=3, label=key)
    return lines


def _panel(ax: Any, panel: Panel, series: dict) -> None:
    names = list(series)
    primary, secondary = _match(panel.keys, names), _match(panel.secondary, names)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if not primary and not secondary:
        expected = ", ".join((*panel.keys, *panel.secondary))
        ax.text(0.5, 0.5, f"no data\n(expected {expected})", ha="center", va="center",
                fontsize=7, color="gray", wrap=True, transform=ax.transAxes)
        return
    lines = _draw(ax, primary, series, "-")
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel, fontsize=8)
    if secondary:
        twin = ax.twinx()
        twin.tick_params(labelsize=8)
        lines += _draw(twin, secondary, series, "--", first_color=len(primary))
        twin.set_ylabel(panel.secondary_ylabel, fontsize=8)
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")


def plot_run(metrics_jsonl: str | Path, out_png: str | Path, *, title: str | None = None) -> Path:
    """Draw :data:`PANELS` from ``metrics_jsonl`` into ``out_png`` and return its path (and,
    if the run recorded tokens, ``tokens_by_position.png`` beside it: ``token_plot``)."""
    from matplotlib.figure import Figure

    from fipo_trainer.trainer.token_plot import POSITIONS_PNG, plot_token_positions

    metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
    if not metrics_jsonl.is_file():
        raise FileNotFoundError(f"{metrics_jsonl} not found; pass a run directory or its {METRICS_FILE}")
    series = load_series(metrics_jsonl)
    fig = Figure(figsize=(12, 11), dpi=100, layout="constrained")
    axes = fig.subplots(3, 2).flatten()
    for ax, panel in zip(axes, PANELS):
        _panel(ax, panel, series)
    last = max((s[-1] for s, _ in series.values()), default=None)
    name = title or metrics_jsonl.parent.name
    fig.suptitle(f"{name} — {'no steps logged' if last is None else f'up to step {last}'}", fontsize=12)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    plot_token_positions(metrics_jsonl.parent, out_png.with_name(POSITIONS_PNG))
    return out_png


def _check_out(parser: argparse.ArgumentParser, out: Path | None, html: bool, compare: bool) -> None:
    """Refuse an ``-o`` that would fail after the drawing (a directory) or hold the wrong
    bytes (PNG under another suffix): a usage error naming the flag and the fix."""
    if out is None:
        return
    name = "page.html" if html else "compare.png" if compare else DEFAULT_PNG
    if out.is_dir():
        parser.error(f"-o/--out {out} is a directory; pass a file path such as {out / name}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        parser.error(f"-o/--out {out}: {parent} is a file, not a directory; pass a path in a directory")
    if not html and out.suffix.lower() != ".png":
        parser.error(f"-o/--out {out}: fipo-plot writes PNG only; use a .png file name such as "
                     f"{out.with_suffix('.png')}")


def main(argv: Sequence[str] | None = None) -> int:
    """``fipo-plot RUN_DIR_or_metrics.jsonl [-o out.png]``."""
    parser = argparse.ArgumentParser(
        prog="fipo-plot", description="Plot training curves from a run's metrics.jsonl to a PNG."
    )
    parser.add_argument("path", type=Path, nargs="?", help=f"run directory or its {METRICS_FILE}")
    parser.add_argument("--compare", nargs="+", type=Path, default=None, metavar="RUN_DIR",
                        help="overlay several runs (seeds grouped: mean + min-max band); "
                        "default output: compare.png in the runs' common parent")
    parser.add_argument("--smooth", type=int, default=1, help="with --compare: moving average over N steps")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help=f"output file, a .png (only PNG is written; default: <run dir>/{DEFAULT_PNG}, "
                        "with --compare the runs' common parent/compare.png); with --tokens the .html page")
    parser.add_argument("--tokens", action="store_true", help="render RUN_DIR's token records (HTML + PNG heat map)")
    parser.add_argument("--step", type=int, default=None, help="with --tokens: this step (default: the latest)")
    parser.add_argument("--timeline", action="store_true",
                        help="draw RUN_DIR/timeline.json (trainer.timeline_json_file) or the trace "
                        "given: a few steps, one lane per worker (default: <trace dir>/timeline.png)")
    parser.add_argument("--window", default=None, metavar="A:B",
                        help="with --timeline: seconds from the trace's first event (default: 4 "
                        "steps from the middle of the run)")
    args = parser.parse_args(argv)
    _check_out(parser, args.out, html=args.tokens and not args.compare, compare=bool(args.compare))
    if args.compare:
        from fipo_trainer.trainer.compare_plot import compare_main

        try:
            return compare_main([*filter(None, [args.path]), *args.compare], args.out, args.smooth)
        except FileNotFoundError as err:
            parser.error(str(err))
    if args.path is None:
        parser.error("pass a run directory (or --compare RUN_DIR RUN_DIR ...)")
    path: Path = args.path
    if args.timeline:
        from fipo_trainer.trainer import timeline_plot

        try:
            return timeline_plot.main(path, args.out, args.window)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    if args.tokens:
        from fipo_trainer.trainer import token_plot

        try:
            return token_plot.main(path, args.step, args.out)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    metrics = path / METRICS_FILE if path.is_dir() else path
    if not metrics.is_file():
        parser.error(f"{metrics} does not exist; pass a run directory containing {METRICS_FILE} or the file itself")
    out = args.out or metrics.parent / DEFAULT_PNG
    print(plot_run(metrics, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
