"""The tracker's backends besides jsonl: console, tensorboard, wandb and swanlab.

Why apart from :mod:`fipo_trainer.trainer.tracking`: each backend wraps one optional
service with its own resume rule (tensorboard purges the steps after the checkpoint,
wandb/swanlab reuse the run id kept in the run dir), while the tracker only fans a flat
metrics dict out to whichever are on. All are imported lazily (the ``loggers`` extra).
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RUN_ID_FILE", "ConsoleBackend", "HostedBackend", "TensorboardBackend"]

RUN_ID_FILE = "tracker_run_id.txt"


# --------------------------------------------------------------------------- console
class ConsoleBackend:
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
class TensorboardBackend:
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


class HostedBackend:
    """A wandb or swanlab run, named by project/experiment, continued on resume (same id)."""

    def __init__(
        self, service: str, run_dir: Path, project: str, experiment: str,
        config: Mapping[str, Any], start_step: int,
    ) -> None:
        self.service = service
        self.module = _import_optional(service)
        if service == "wandb":
            where = {"name": experiment, "dir": str(run_dir)}
        else:
            logdir = run_dir / "swanlab"
            logdir.mkdir(parents=True, exist_ok=True)
            where = {"experiment_name": experiment, "logdir": str(logdir)}
        self.run = self.module.init(
            project=project, config=dict(config), id=_run_id(run_dir, start_step),
            resume="allow", **where,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.service == "wandb":
            self.run.log(metrics, step=step)
        else:  # swanlab rejects NaN/inf less gracefully than the others; drop them there.
            self.module.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        if self.service == "wandb":
            self.run.finish()
        else:
            self.module.finish()
