"""Hydra multirun: one run directory per job, the sweep's summary, and the sweep's job list.

Why: ``fipo-train --multirun algorithm=fipo,dapo`` is how ablations are run, and without
this every job would write into the same ``trainer.run_dir``. In multirun mode a job's run
directory is the Hydra job directory, ``hydra.sweep.dir/hydra.sweep.subdir``
(``configs/config.yaml``: ``<trainer.run_dir>/multirun/<time>/<the job's overrides>``, with
the launching config's ``trainer.run_dir``, so one sweep has one directory even when it
sweeps ``recipe`` or ``trainer.experiment_name``: :func:`launch_path`).
:class:`SweepSummary` (a Hydra callback registered in ``config.yaml``) records each job's
wall time and status in its run directory, rewrites ``sweep_summary.csv`` in the sweep
directory after every job (so a failed or interrupted sweep still has one), and prints the
table at the end. :func:`expand_sweep` is Hydra's BasicSweeper expansion without launching,
so ``--dry-run --multirun`` and the pre-flight check validate every job.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fipo_trainer.fsutil import atomic_file
from fipo_trainer.trainer.tracking import METRICS_FILE

__all__ = [
    "JOB_RECORD",
    "SUMMARY_CSV",
    "SweepRow",
    "SweepSummary",
    "dirname_override",
    "expand_sweep",
    "is_multirun",
    "job_dir_name",
    "launch_path",
    "multirun_job_dir",
    "print_summary_table",
    "register_resolvers",
    "summarize_sweep",
    "varying_overrides",
    "write_summary_csv",
]

logger = logging.getLogger(__name__)

JOB_RECORD = "sweep_job.json"
SUMMARY_CSV = "sweep_summary.csv"
MULTIRUN_FLAGS = ("--multirun", "-m")
_MAX_DIR_NAME = 200  # file systems allow 255 bytes per name


# ----------------------------------------------------------------------------- job dirs
def job_dir_name(override_dirname: Any, num: Any = 0) -> str:
    """A job's directory name: its overrides (``algorithm=dapo,trainer.seed=1``), with path
    separators replaced (a path-valued override must not nest directories), ``job<num>``
    when the job has no overrides, and shortened with a hash when too long."""
    name = str(override_dirname or "").replace("/", "_").replace("\\", "_").strip(". ")
    if not name:
        return f"job{num}"
    if len(name) > _MAX_DIR_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_DIR_NAME - 11]}-{digest}"
    return name


_LAUNCH_PATH = "fipo_launch_path"


def launch_path(key: str, *, _root_: Any) -> str:
    """``${fipo_launch_path:trainer.run_dir}`` (``hydra.sweep.dir``): the path ``key`` holds
    in the config that launched the sweep, ``~`` expanded, whatever each job's config says.

    Why: Hydra resolves ``hydra.sweep.dir`` again in every job's config, where a swept key
    (``recipe``, ``trainer.experiment_name``) has changed ``trainer.run_dir``, so each job
    landed in a sweep directory of its own and ``sweep_summary.csv`` listed one job. Hydra
    copies the launching config's resolver cache into every job's config (that is how their
    ``${now:}`` agree), so the value is memoised there: the launcher resolves it first."""
    memo = OmegaConf.get_cache(_root_).setdefault(_LAUNCH_PATH, {})
    if key not in memo:
        value = OmegaConf.select(_root_, key)
        if value is None:
            raise KeyError(f"${{{_LAUNCH_PATH}:{key}}}: the config has no {key}")
        memo[key] = os.path.expanduser(str(value))
    return memo[key]


def register_resolvers() -> None:
    """``${fipo_job_dir:...}`` for ``hydra.sweep.subdir``; ``${fipo_path:...}`` and
    ``${fipo_launch_path:...}`` (`launch_path`) for Hydra's run and sweep directories: ``~``
    expanded, as the trainer expands ``trainer.run_dir`` (Hydra would write ``.hydra/`` into
    a directory literally named ``~``). Idempotent."""
    if not OmegaConf.has_resolver("fipo_job_dir"):
        OmegaConf.register_new_resolver("fipo_job_dir", job_dir_name)
    if not OmegaConf.has_resolver("fipo_path"):
        OmegaConf.register_new_resolver("fipo_path", lambda path: os.path.expanduser(str(path)))
    if not OmegaConf.has_resolver(_LAUNCH_PATH):
        OmegaConf.register_new_resolver(_LAUNCH_PATH, launch_path)


register_resolvers()


def _hydra_cfg() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun(hydra_cfg: Any | None = None) -> bool:
    """Whether the current Hydra job is one job of a sweep."""
    from hydra.types import RunMode

    hydra_cfg = hydra_cfg if hydra_cfg is not None else _hydra_cfg()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def multirun_job_dir() -> str | None:
    """The current sweep job's own directory (None outside a multirun job)."""
    hydra_cfg = _hydra_cfg()
    if not is_multirun(hydra_cfg):
        return None
    return str(hydra_cfg.runtime.output_dir)


# ----------------------------------------------------------------------------- the sweep
def expand_sweep(overrides: Sequence[str], params: Mapping[str, str] | None = None) -> list[list[str]]:
    """Every job's overrides, as Hydra's BasicSweeper would launch them (``params`` =
    ``hydra.sweeper.params`` of the composed config, which the command line overrides)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    parsed = OverridesParser.create().parse_overrides(arguments)
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    return jobs


def dirname_override(args: Sequence[str], jobs: Sequence[Sequence[str]]) -> str | None:
    """``hydra.job.config.override_dirname.exclude_keys=[...]`` listing every key that is the
    same in all jobs (and ``trainer.run_dir``), so a job's directory is named by what the
    sweep varies (``algorithm=dapo,trainer.seed=1``). None when the user set it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith(_DIRNAME_KEY) for a in args):
        return None
    parser = OverridesParser.create()
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in parser.parse_overrides(list(job)):
            values.setdefault(override.key_or_group, set()).add(str(override.input_line))
    fixed = ["trainer.run_dir", *(k for k, v in values.items() if len(v) == 1 or len(jobs) < 2)]
    return f"{_DIRNAME_KEY}=[{','.join(repr(k) for k in dict.fromkeys(fixed))}]"


_DIRNAME_KEY = "hydra.job.config.override_dirname.exclude_keys"


def swept_run_dir(jobs: Sequence[Sequence[str]]) -> str | None:
    """Why a sweep over ``trainer.run_dir`` cannot run, or None: each job runs in
    ``<hydra.sweep.dir>/<its overrides>``, and a sweep has one sweep dir (:func:`launch_path`),
    so the swept values would be ignored."""
    run_dirs = {a.split("=", 1)[1] for job in jobs for a in job if a.startswith("trainer.run_dir=")}
    if len(run_dirs) < 2:
        return None
    return (
        "trainer.run_dir cannot be swept (each job runs in <sweep dir>/<its overrides>); "
        "set hydra.sweep.dir=DIR for where the sweep goes"
    )


def sweeper_params(overrides: Sequence[str], config_dir: str | Path, config_name: str) -> dict[str, str]:
    """``hydra.sweeper.params`` of the multirun config (a recipe may define its sweep); {}
    when the overrides do not compose (each job's validation then names the problem)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    import fipo_trainer.trainer.config  # noqa: F401 - registers the schema

    with initialize_config_dir(str(config_dir), version_base=None):
        loader = GlobalHydra.instance().config_loader()
        try:
            cfg = loader.load_configuration(config_name, list(overrides), run_mode=RunMode.MULTIRUN)
        except Exception:  # an unknown key, a missing recipe: reported per job
            return {}
        params = OmegaConf.select(cfg, "hydra.sweeper.params")
    return {str(k): str(v) for k, v in (params or {}).items()}


# ----------------------------------------------------------------------------- summary
@dataclass
class SweepRow:
    """One job of a sweep, as the summary table shows it."""

    job: int
    overrides: str
    status: str
    steps: int
    val_metric: str
    val_first: float | None
    val_best: float | None
    val_last: float | None
    wall_s: float | None
    run_dir: str


def _val_key(series: Mapping[str, Any]) -> str | None:
    """The overall mean@k key (``val/mean@4``), not a per-source one."""
    keys = [k for k in series if k.startswith("val/") and "mean@" in k]
    return min(keys, key=lambda k: (k.count("/"), k), default=None)


def _job_row(record_path: Path) -> SweepRow:
    from fipo_trainer.trainer.plot import load_series

    record = json.loads(record_path.read_text())
    run_dir = record_path.parent
    series = load_series(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else {}
    steps = max((s for steps, _ in series.values() for s in steps), default=0)
    key = _val_key(series)
    values = series[key][1] if key else []
    return SweepRow(
        job=int(record.get("num", 0)),
        overrides=" ".join(record.get("overrides", [])),
        status=str(record.get("status", "?")),
        steps=int(steps),
        val_metric=key or "",
        val_first=values[0] if values else None,
        val_best=max(values) if values else None,
        val_last=values[-1] if values else None,
        wall_s=record.get("wall_s"),
        run_dir=str(run_dir),
    )


def summarize_sweep(sweep_dir: str | Path) -> list[SweepRow]:
    """A row per job directory below ``sweep_dir`` (read from its files), in job order."""
    records = sorted(Path(sweep_dir).glob(f"**/{JOB_RECORD}"))
    return sorted((_job_row(p) for p in records), key=lambda r: r.job)


def write_summary_csv(rows: Sequence[SweepRow], path: str | Path) -> Path:
    """``sweep_summary.csv`` (one row per job; empty fields where a job has no value)."""
    path = Path(path)
    with atomic_file(path) as f:
        names = [field.name for field in fields(SweepRow)]
        writer = csv.DictWriter(f, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    return path


def varying_overrides(rows: Sequence[SweepRow]) -> tuple[list[str], list[str]]:
    """(each job's overrides that differ between jobs, the overrides all jobs share)."""
    split = [r.overrides.split() for r in rows]
    common = [o for o in (split[0] if split else []) if all(o in s for s in split)]
    return [" ".join(o for o in s if o not in common) or "(none)" for s in split], common


def print_summary_table(rows: Sequence[SweepRow], sweep_dir: str | Path, console: Any = None) -> None:
    """The sweep's table: job overrides | steps | first / best / last val mean@k | wall time."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    shown, common = varying_overrides(rows)
    metric = next((r.val_metric for r in rows if r.val_metric), "val mean@k")
    table = Table(title=f"fipo-train sweep: {len(rows)} jobs in {sweep_dir}")
    for name in ("job overrides", "status", "steps", f"{metric} first", "best", "last", "wall"):
        table.add_column(name, justify="left" if name in ("job overrides", "status") else "right")
    for row, label in zip(rows, shown):
        wall = "-" if row.wall_s is None else f"{row.wall_s / 60:.1f} min"
        table.add_row(
            escape(label), row.status, str(row.steps), num(row.val_first), num(row.val_best),
            num(row.val_last), wall,
        )
    if common:
        table.caption = escape("every job: " + " ".join(common))
    (console or Console()).print(table)


class SweepSummary(Callback):
    """Hydra callback: per-job record + ``sweep_summary.csv`` + the table (multirun only)."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_multirun():
            self._started[str(config.hydra.runtime.output_dir)] = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not is_multirun():
            return
        out = Path(str(config.hydra.runtime.output_dir))
        start = self._started.pop(str(out), None)
        status = getattr(job_return.status, "name", str(job_return.status)).lower()
        record = {
            "num": int(config.hydra.job.num),
            "overrides": list(job_return.overrides or []),
            "status": status,
            "wall_s": None if start is None else round(time.perf_counter() - start, 2),
        }
        if status == "failed":
            record["error"] = repr(job_return._return_value)
        try:
            with atomic_file(out / JOB_RECORD) as f:
                f.write(json.dumps(record, indent=1) + "\n")
            sweep_dir = Path(str(config.hydra.sweep.dir))
            write_summary_csv(summarize_sweep(sweep_dir), sweep_dir / SUMMARY_CSV)
        except OSError as exc:  # a summary must never fail the job
            logger.warning("could not write the sweep summary: %s", exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = summarize_sweep(sweep_dir)
        csv_path = write_summary_csv(rows, sweep_dir / SUMMARY_CSV)
        print_summary_table(rows, sweep_dir)
        print(f"sweep summary: {csv_path}", flush=True)
