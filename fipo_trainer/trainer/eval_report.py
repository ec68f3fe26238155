"""``fipo-eval`` results: the per-data-source metrics dict and the printed table.

Why apart from the run: the results are a pure function of the graded records (the same
metrics as training validation, :mod:`fipo_trainer.trainer.validation_metrics`, renamed to
the papers' avg@k / cons@k / pass@k), while the run in :mod:`fipo_trainer.trainer.evaluate`
owns the engine, the grader pool and the files.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from fipo_trainer.trainer.validation_metrics import validation_metrics

__all__ = ["paper_comparison", "print_paper_comparison", "print_table", "results", "write_outputs"]


def _summary(metrics: dict[str, float], k: int, prefix: str) -> dict[str, float]:
    return {
        "num_prompts": int(metrics[f"{prefix}num_prompts"]),
        f"avg@{k}": metrics[f"{prefix}mean@{k}"],
        f"cons@{k}": metrics[f"{prefix}maj@{k}"],
        f"pass@{k}": metrics[f"{prefix}best@{k}"],
    }


def results(cfg, model_dir, files, records, max_tokens, timings) -> dict[str, Any]:
    k = cfg.k
    metrics = validation_metrics(
        [r["data_source"] for r in records],
        [r["uid"] for r in records],
        [r["acc"] for r in records],
        [r["pred"] for r in records],
        [r["score"] for r in records],
        prefix="eval",
    )
    lengths: dict[str, list[int]] = defaultdict(list)
    truncated: dict[str, list[bool]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    for r in records:
        for key in (r["data_source"], None):
            lengths[key].append(r["response_length"])
            truncated[key].append(r["truncated"])
            failed[key] += r["grade_status"] != "ok"

    def extra(key):
        return {
            "response_length_mean": sum(lengths[key]) / len(lengths[key]),
            "truncated_frac": sum(truncated[key]) / len(truncated[key]),
            "grading_failures": failed[key],
        }

    sources = sorted({r["data_source"] for r in records})
    return {
        "model": str(model_dir),
        "engine": cfg.engine,
        "files": [str(f) for f in files],
        "k": k,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                     "max_tokens": max_tokens, "seed": cfg.seed},
        "results": {ds: {**_summary(metrics, k, f"eval/{ds}/"), **extra(ds)} for ds in sources},
        "overall": {**_summary(metrics, k, "eval/"), **extra(None)},
        "metrics": metrics,
        "seconds": {name: round(v, 3) for name, v in timings.items()},
        "config": asdict(cfg),
    }


def print_table(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    k = result["k"]
    s = result["sampling"]
    table = Table(title=Text(f"{result['model']}  (k={k}, T={s['temperature']}, top_p={s['top_p']}, max_tokens={s['max_tokens']})"))
    table.add_column("data source")
    table.add_column("prompts", justify="right")
    for name in (f"avg@{k}", f"cons@{k}", f"pass@{k}"):
        table.add_column(name, justify="right")
    table.add_column("mean len", justify="right")
    table.add_column("truncated", justify="right")

    def add(name, r, **style):
        table.add_row(
            name, str(r["num_prompts"]),
            *(f"{r[m]:.4f}" for m in (f"avg@{k}", f"cons@{k}", f"pass@{k}")),
            f"{r['response_length_mean']:.0f}", f"{r['truncated_frac']:.1%}", **style,
        )

    for ds, r in result["results"].items():
        add(ds, r)
    if len(result["results"]) > 1:
        add("overall", result["overall"], style="bold")
    console.print(table)


def paper_comparison(result: dict[str, Any]) -> list[list[str]]:
    """Rows (benchmark, run, avg, cons, pass, sampling) in percent: this model on each AIME
    data source it was evaluated on, then the paper's DAPO/FIPO rows for that benchmark
    (:mod:`fipo_trainer.trainer.published`). Empty when no AIME data was evaluated."""
    from fipo_trainer.trainer.published import PAPER_SAMPLING, PUBLISHED, benchmark_of

    k, s = result["k"], result["sampling"]
    ours = f"k={k}, T={s['temperature']}, top_p={s['top_p']}, max_tokens={s['max_tokens']}"
    paper = "k={k}, T={temperature}, top_p={top_p}, max_tokens={max_tokens}".format(**PAPER_SAMPLING)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows = []
    for ds, r in result["results"].items():
        bench = benchmark_of(ds)
        if bench is None:
            continue
        rows.append([bench, f"this model ({ds})", *(pct(100 * r[f"{m}@{k}"]) for m in ("avg", "cons", "pass")), ours])
        for p in PUBLISHED:
            if p.benchmark == bench:
                name = f"paper: {p.method}, {p.model}" + (f" ({p.note})" if p.note else "")
                rows.append([bench, name, pct(p.avg), pct(p.cons), pct(p.pass_), paper])
    return rows


def print_paper_comparison(console: Any, result: dict[str, Any]) -> None:
    """The evaluated model beside the paper's published numbers (only for AIME 24/25)."""
    from rich.table import Table

    rows = paper_comparison(result)
    if not rows:
        return
    k = result["k"]
    table = Table(title="AIME: this model vs the FIPO paper (percent)")
    for name in ("benchmark", "run", f"avg@{k} / @32", f"cons@{k} / @32", f"pass@{k} / @32", "sampling"):
        table.add_column(name, justify="right" if "@" in name else "left")
    for row in rows:
        table.add_row(*row, style="bold" if row[1].startswith("this model") else None)
    if k != 32:
        table.caption = f"this model at k={k}: cons@k and pass@k grow with k, so they are not comparable with @32"
    console.print(table)


def write_outputs(
    console: Any, result: dict[str, Any], records: Sequence[dict], out: str | None, save_responses: str | None
) -> list[str]:
    """Write the results JSON (``out``) and the graded responses (``save_responses``).

    Why the fallback: the paths were checked before sampling, but a write can still fail
    (disk full, a directory removed meanwhile); hours of sampling must not be lost then, so
    the file goes to the temp dir instead and the message says where. Returns the flags
    whose file is not where asked."""
    def write_results(f: IO[str]) -> None:
        f.write(json.dumps(result, indent=2) + "\n")

    def write_responses(f: IO[str]) -> None:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    jobs: list[tuple[str, str, str | None, Callable[[IO[str]], None]]] = [
        ("--out", "results", out, write_results),
        ("--save-responses", "responses", save_responses, write_responses),
    ]
    unwritten = []
    for flag, what, target, write in jobs:
        if not target:
            continue
        path = Path(target).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as f:
                write(f)
        except OSError as exc:
            unwritten.append(flag)
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            fallback = Path(tempfile.gettempdir()) / f"fipo-eval-{stamp}-{path.name or what}"
            try:
                with fallback.open("w", encoding="utf-8") as f:
                    write(f)
                where = f"saved to {fallback} instead"
            except OSError as exc2:
                where = f"not saved ({fallback}: {exc2})" + ("; the table above has them" if flag == "--out" else "")
            console.print(f"could not write {flag} {path}: {exc}; the {what} were {where}",
                          style="bold red", markup=False, highlight=False)
            continue
        console.print(f"{what}: {path}", markup=False, highlight=False)
    return unwritten
