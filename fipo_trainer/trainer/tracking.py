"""Metric tracking: one ``Tracker`` fanning out to console, jsonl, tensorboard, wandb, swanlab.

Why one object: the loop logs a flat ``{name: float}`` dict per step once and never cares
which backends are on. The jsonl file is always written (it is what ``fipo-plot`` and the
tests read, and it survives without any service). Resumed runs must not show duplicated or
stale steps, so on resume every backend drops what was logged after the checkpoint's step
(jsonl rewrites the file, tensorboard purges, wandb/swanlab reuse the run id). This module
holds the tracker and the jsonl record; the other backends are
:mod:`fipo_trainer.trainer.tracking_backends`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fipo_trainer.fsutil import atomic_file
from fipo_trainer.trainer.tracking_backends import (
    ConsoleBackend,
    HostedBackend,
    TensorboardBackend,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_SUMMARY_KEYS",
    "METRICS_FILE",
    "Tracker",
    "read_metrics",
    "restore_checkpoint_row",
    "sanitize_metrics",
]

logger = logging.getLogger(__name__)

BACKENDS = ("console", "jsonl", "tensorboard", "wandb", "swanlab")
METRICS_FILE = "metrics.jsonl"

#: (key or fnmatch pattern, short label) shown on the per-step console line, in this order.
DEFAULT_SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("reward/score_mean", "score"),
    ("reward/acc_mean", "acc"),
    ("val/mean@*", "val"),
    ("actor/pg_loss", "loss"),
    ("actor/entropy", "ent"),
    ("actor/ppo_kl", "kl"),
    ("actor/pg_clipfrac", "clip"),
    ("actor/influence_weights_mean", "iw"),
    ("actor/grad_norm", "gnorm"),
    ("rollout/response_length_mean", "len"),
    ("response_length/mean", "len"),
    ("perf/step_seconds", "s/step"),
)


class _Backend(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- values
def _as_float(value: Any) -> float | None:
    """float of Python/numpy/torch scalars; None for anything that is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)  # numpy scalars, 0-d arrays, 1-element tensors
    if callable(item):
        try:
            return _as_float(item())
        except (ValueError, RuntimeError, TypeError):
            return None
    return None


def sanitize_metrics(metrics: Mapping[str, Any], warned: set[str] | None = None) -> dict[str, float]:
    """Plain floats (NaN/inf kept); non-numeric values are dropped with one warning per key."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        f = _as_float(value)
        if f is None:
            if warned is None or key not in warned:
                logger.warning("metric %r has non-numeric value %r (%s); not logged", key, value, type(value).__name__)
                if warned is not None:
                    warned.add(key)
            continue
        out[str(key)] = f
    return out


def _json_value(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no NaN/inf; null keeps the key visible


# --------------------------------------------------------------------------- jsonl
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl in file order; unreadable lines (a torn last write) are skipped."""
    rows: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def restore_checkpoint_row(run_dir: str | Path, step: int, row: Mapping[str, Any] | None) -> bool:
    """Write the row a checkpoint carries for its own ``step`` when ``metrics.jsonl`` has no
    row of that step or later; whether it did.

    Why: a step's row is logged after its checkpoint is saved (the row holds the save's
    time), so a run stopped between the two lost that row for good, a resume going on after
    it. A file that is absent (a fresh directory, another run's checkpoint) is left alone.
    """
    path = Path(run_dir) / METRICS_FILE
    if not row or not path.is_file():
        return False
    rows = read_metrics(path)
    if any(r["step"] >= step for r in rows):
        return False
    with atomic_file(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        clean = sanitize_metrics(row, set(row))
        f.write(json.dumps({"step": step, **{k: _json_value(v) for k, v in clean.items()}}) + "\n")
    logger.info("%s: step %d's row written from its checkpoint (stopped before logging it)",
                path, step)  # fmt: skip
    return True


class _JsonlBackend:
    """``metrics.jsonl``: one object per ``log`` call, ``step`` first, flushed immediately.

    ``start_step == 0`` starts a new file; ``start_step > 0`` keeps the lines with
    ``step <= start_step`` (rewritten atomically) and appends after them.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / METRICS_FILE
        if start_step > 0 and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            with atomic_file(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self._file = self.path.open("a", encoding="utf-8")
        else:
            self._file = self.path.open("w", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# --------------------------------------------------------------------------- tracker
class Tracker:
    """Logs one flat metrics dict per step to every selected backend.

    ``backends``: names from :data:`BACKENDS` (``trainer.loggers``); jsonl is always on.
    ``start_step``: the resumed checkpoint's step (0 for a fresh run); see the module doc.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        backends: Sequence[str],
        run_dir: str | Path,
        project: str,
        experiment: str,
        config: Mapping[str, Any],
        total_steps: int,
        start_step: int = 0,
        *,
        summary_keys: Sequence[tuple[str, str]] = DEFAULT_SUMMARY_KEYS,
        console: Any = None,
    ) -> None:
        names = [str(b).strip().lower() for b in backends]
        unknown = [b for b in names if b not in BACKENDS]
        if unknown:
            raise ValueError(f"trainer.loggers has unknown logger(s) {unknown}; choose from {list(BACKENDS)}")
        if start_step < 0:
            raise ValueError(f"Tracker start_step must be >= 0, got {start_step}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.start_step = int(start_step)
        self._warned: set[str] = set()
        self._closed = False
        self.backends: dict[str, _Backend] = {}
        ordered = ["jsonl"] + [b for b in dict.fromkeys(names) if b != "jsonl"]
        try:
            for name in ordered:
                self.backends[name] = self._build(
                    name, project, experiment, config, total_steps, summary_keys, console
                )
        except BaseException:
            self.close()
            raise

    def _build(self, name, project, experiment, config, total_steps, summary_keys, console) -> _Backend:
        if name == "jsonl":
            return _JsonlBackend(self.run_dir, self.start_step)
        if name == "console":
            resumed = f" (resumed at step {self.start_step})" if self.start_step else ""
            header = f"{project}/{experiment}: run dir {self.run_dir}{resumed}"
            return ConsoleBackend(total_steps, self.start_step, summary_keys, header, console)
        if name == "tensorboard":
            return TensorboardBackend(self.run_dir, self.start_step, config)
        return HostedBackend(name, self.run_dir, project, experiment, config, self.start_step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Send ``metrics`` at ``step`` to every backend (non-finite values: null in jsonl)."""
        if self._closed:
            raise RuntimeError("Tracker.log() after close()")
        clean = sanitize_metrics(metrics, self._warned)
        for name, backend in self.backends.items():
            try:
                backend.log(clean, int(step))
            except Exception:
                if name == "jsonl":
                    raise  # the record of the run: never lose it silently
                logger.exception("logger %s failed at step %d; continuing", name, step)

    def close(self) -> None:
        """Flush and close every backend (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for name, backend in reversed(list(self.backends.items())):
            try:
                backend.close()
            except Exception:
                logger.exception("closing logger %s failed", name)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

