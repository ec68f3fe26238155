"""The trainer driver's tokenizer: ``AutoTokenizer.from_pretrained`` vs ``load_tokenizer``.

Why: in transformers 5 importing AutoTokenizer imports the auto model mappings and with them
``torch._dynamo``, sympy and triton, which the driver (it tokenizes prompts, never runs a
model) pays for in start-up CPU and memory; ``data.tokenization.load_tokenizer`` loads the
same tokenizer class directly where it is known. Each row loads the quickstart's tiny-model
tokenizer in a fresh interpreter that first imports what ``fipo-train`` imports before Ray
starts, and reports the load's CPU seconds, the growth of the process's PSS and which heavy
modules came in. Modes alternate so a slow minute hits both; the table shows medians.

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_tokenizer_load.py --repeats 3

The last line is ``SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODES = ("AutoTokenizer", "load_tokenizer")
HEAVY = ("torch._dynamo", "sympy", "triton", "transformers.models.auto.modeling_auto")


def _pss_mib() -> float:
    """This process's proportional set size (Linux ``smaps_rollup``; 0 elsewhere)."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child(mode: str, model_path: str) -> dict:
    """One tokenizer load in this fresh process, after the driver's own imports."""
    import fipo_trainer.trainer.loop  # noqa: F401 - what fipo-train imports before Ray starts

    cpu, pss = time.process_time(), _pss_mib()
    if mode == "AutoTokenizer":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    else:
        from fipo_trainer.data.tokenization import load_tokenizer

        tokenizer = load_tokenizer(model_path)
    return {
        "cpu_s": time.process_time() - cpu,
        "pss_mib": _pss_mib() - pss,
        "class": type(tokenizer).__name__,
        "heavy": [m for m in HEAVY if m in sys.modules],
    }


def run_child(mode: str, model_path: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, model_path],
        capture_output=True, text=True, check=False, timeout=300,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return 0

    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from fipo_trainer.data.tiny_model import build_tiny_model

    model_path = str(build_tiny_model(hidden_size=64, num_layers=2, task_digits=1))
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    jobs = [m for _ in range(args.repeats) for m in MODES]
    for mode in track(jobs, description="tokenizer loads"):
        results[mode].append(run_child(mode, model_path))

    table = Table(title=f"driver tokenizer load (median of {args.repeats}, fresh process)")
    for col in ("loader", "class", "CPU-s", "PSS MiB", "heavy modules imported"):
        table.add_column(col, justify="left" if col in ("loader", "class") else "right")
    summary: dict[str, float] = {}
    for mode in MODES:
        rows = results[mode]
        cpu = statistics.median(r["cpu_s"] for r in rows)
        pss = statistics.median(r["pss_mib"] for r in rows)
        table.add_row(mode, rows[0]["class"], f"{cpu:.2f}", f"{pss:.0f}", ", ".join(rows[0]["heavy"]) or "-")
        summary |= {f"{mode}_cpu_s": round(cpu, 3), f"{mode}_pss_mib": round(pss, 1)}
    Console().print(table)
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
