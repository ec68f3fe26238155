"""``fipo-eval`` results: the per-data-source metrics dict and the printed table.

Why apart from the run: the results are a pure function of the graded records (the same
metrics as training validation, :mod:`fipo_trainer.trainer.validation_metrics`, renamed to
the papers' avg@k / cons@k / pass@k), while the run in :mod:`fipo_trainer.trainer.evaluate`
owns the engine, the grader pool and the files.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from typing import Any

from fipo_trainer.trainer.validation_metrics import validation_metrics

__all__ = ["print_table", "results"]


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
