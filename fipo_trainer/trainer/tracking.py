"""Metric tracking: one ``Tracker`` fanning out to console, jsonl, tensorboard, wandb, swanlab.

Why one object: the loop logs a flat ``{name: float}`` dict per step once and never cares
which backends are on. The jsonl file is always written (it is what ``fipo-plot`` and the
tests read, and it survives without any service). Resumed runs must not show duplicated or
stale steps, so on resume every backend drops what was logged after the checkpoint's step
(jsonl rewrites the file, tensorboard purges, wandb/swanlab reuse the run id).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "BACKENDS",
    "DEFAULT_SUMMARY_KEYS",
    "METRICS_FILE",
    "Tracker",
    "read_metrics",
    "sanitize_metrics",
]

logger = logging.getLogger(__name__)

BACKENDS = ("console", "jsonl", "tensorboard", "wandb", "swanlab")
METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "tracker_run_id.txt"

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


class _JsonlBackend:
    """``metrics.jsonl``: one object per ``log`` call, ``step`` first, flushed immediately.

    ``start_step == 0`` starts a new file; ``start_step > 0`` keeps the lines with
    ``step <= start_step`` (rewritten atomically) and appends after them.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / METRICS_FILE
        if start_step > 0 and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
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


# --------------------------------------------------------------------------- console
class _ConsoleBackend:
    """A rich progress bar over steps plus one compact line per step.

    Without a terminal (CI, ``| tee``, Ray job logs) a live bar would print nothing useful
    or garbage, so each line carries the step count, elapsed time and ETA instead.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        summary_keys: Sequence[tuple[str, str]],
        header: str,
        console: Any = None,
    ) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(soft_wrap=True)
        self.total = max(int(total_steps), 0)
        self.start_step = start_step
        self.summary_keys = tuple(summary_keys)
        self._t0 = time.monotonic()
        self._progress = None
        self.console.print(header, highlight=False, markup=False, soft_wrap=True)
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("steps", total=self.total or None, completed=start_step)
            self._progress.start()

    def summary(self, metrics: dict[str, float]) -> str:
        parts: list[str] = []
        used: set[str] = set()
        for pattern, label in self.summary_keys:
            keys = sorted(fnmatch.filter(metrics, pattern)) if any(c in pattern for c in "*?[") else [pattern]
            for key in keys:
                if key in metrics and key not in used and label not in {p.split("=")[0] for p in parts}:
                    used.add(key)
                    name = key.removeprefix("val/") if label == "val" else label
                    parts.append(f"{name}={metrics[key]:.4g}")
        return "  ".join(parts)

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        elapsed = time.monotonic() - self._t0
        if done <= 0 or not self.total or step >= self.total:
            return _hms(elapsed)
        return f"{_hms(elapsed)} eta {_hms(elapsed / done * (self.total - step))}"

    def log(self, metrics: dict[str, float], step: int) -> None:
        total = f"/{self.total}" if self.total else ""
        line = f"step {step}{total}  {self.summary(metrics)}"
        if self._progress is not None:
            self._progress.update(self._task, completed=max(step, self._progress.tasks[0].completed))
            self._progress.console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            self.console.print(f"[{self._eta(step)}] {line}", highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------- tensorboard
class _TensorboardBackend:
    def __init__(self, run_dir: Path, start_step: int, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop older events at steps >= it, i.e. what an interrupted run
        # logged after its checkpoint, or (0) everything of an earlier run in this directory.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else 0)
        if start_step == 0:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("config", "```\n" + text + "\n```", global_step=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- wandb / swanlab
def _import_optional(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"trainer.loggers includes {name!r} but {name} is not installed ({exc}); "
            f"run `pip install fipo-trainer[loggers]` (or `pip install {name}`), "
            f"or remove {name!r} from trainer.loggers"
        ) from exc


def _run_id(run_dir: Path, start_step: int) -> str:
    """A per-run-dir id, reused on resume so wandb/swanlab continue the same run."""
    path = run_dir / RUN_ID_FILE
    if start_step > 0 and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    path.write_text(run_id + "\n")
    return run_id


class _WandbBackend:
    def __init__(self, run_dir: Path, project: str, experiment: str, config: Mapping[str, Any], start_step: int) -> None:
        self.wandb = _import_optional("wandb")
        self.run = self.wandb.init(
            project=project,
            name=experiment,
            config=dict(config),
            dir=str(run_dir),
            id=_run_id(run_dir, start_step),
            resume="allow",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _SwanlabBackend:
    def __init__(self, run_dir: Path, project: str, experiment: str, config: Mapping[str, Any], start_step: int) -> None:
        self.swanlab = _import_optional("swanlab")
        logdir = run_dir / "swanlab"
        logdir.mkdir(parents=True, exist_ok=True)
        self.run = self.swanlab.init(
            project=project,
            experiment_name=experiment,
            config=dict(config),
            logdir=str(logdir),
            id=_run_id(run_dir, start_step),
            resume="allow",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        # swanlab rejects NaN/inf less gracefully than the others; drop them there.
        self.swanlab.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.swanlab.finish()


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
            return _ConsoleBackend(total_steps, self.start_step, summary_keys, header, console)
        if name == "tensorboard":
            return _TensorboardBackend(self.run_dir, self.start_step, config)
        if name == "wandb":
            return _WandbBackend(self.run_dir, project, experiment, config, self.start_step)
        return _SwanlabBackend(self.run_dir, project, experiment, config, self.start_step)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

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

