"""What a finished run leaves behind, and the table ``fipo-train`` prints at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    """What a finished run leaves behind (paths are inside the run directory)."""

    run_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    export_dir: Path | None = None
    plot: Path | None = None


def validation_summary(validations: list[dict[str, float]]) -> tuple[str, float, float] | None:
    """(metric, first value, best value) of the overall mean@k validation accuracy."""
    if not validations:
        return None
    keys = sorted(k for k in validations[0] if k.startswith("val/mean@"))
    if not keys:
        return None
    key = keys[0]
    values = [v[key] for v in validations if key in v]
    return key, values[0], max(values)


def print_summary(result: TrainResult) -> None:
    """Where everything went, and how validation moved."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fipo-train: {result.steps} steps", show_header=False)
    rows = [
        ("run directory", result.run_dir),
        ("metrics", result.run_dir / "metrics.jsonl"),
        ("tensorboard", result.run_dir / "tensorboard"),
        ("rollout dumps", result.run_dir / "rollouts"),
        ("curves (PNG)", result.plot),
        ("checkpoint", result.checkpoint),
        ("HF export", result.export_dir),
    ]
    summary = validation_summary(result.validations)
    if summary:
        key, first, best = summary
        rows.append((key, f"first {first:.3f} -> best {best:.3f} ({best - first:+.3f})"))
    for name, value in rows:
        if value is not None:
            table.add_row(name, str(value))
    Console().print(table)


