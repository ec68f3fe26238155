"""Reward grading throughput: DAPO rule and math-verify through RewardPool, 1 vs 2 workers.

Responses are long synthetic chains of thought (2-6k characters) ending in a final answer: the
ground truth, an equivalent form of it, or a wrong one. Ground truths come from
DAPO-Math-17k (DAPO rule) and MATH-500 (math-verify) when the parquet files are found in
``--data-dir``, else from a built-in list. Batches
are shaped like GRPO rollouts: ``--prompts`` prompts x ``--n`` responses each, and every timed
batch has new prompts, so per-ground-truth caches start cold as in training. The in-process
row grades in the calling process (no isolation, one core) for reference. items/CPU-s counts
the CPU time of the parent and its workers, which stays meaningful on a loaded machine.

    .venv/bin/python scripts/bench_rewards.py            # 2,048 items, 1 and 2 workers
    .venv/bin/python scripts/bench_rewards.py --workers 1 2 4 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fipo_trainer.rewards import RewardConfig, RewardPool
from fipo_trainer.rewards import dapo as dapo_rule
from fipo_trainer.rewards import math_verify as mv_rule
from fipo_trainer.rewards.config import available_cpus

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared/data"
# Ground truths per grader: DAPO-Math-17k answers are integers; MATH-500 has LaTeX answers.
DEFAULT_DATA = {"dapo": "dapo-math-17k.parquet", "math_verify": "math-500.parquet"}
TARGETS = {"dapo": 5000.0, "math_verify": 200.0}  # items/s on 2 cores
SOURCES = {"dapo": "math_dapo", "math_verify": "math500"}
FALLBACK_GTS = ["34", "\\frac{3}{4}", "2\\sqrt{3}", "104", "\\frac{\\pi}{2}", "-7", "(1,2)", "0.25"]
SENTENCES = [
    "Let me denote the unknown by $x$ and write down what we know.",
    "Substituting $x = 3$ into $x^2 + 2x - 15$ gives $9 + 6 - 15 = 0$, so it is a root.",
    "By the AM-GM inequality, $\\frac{a+b}{2} \\ge \\sqrt{ab}$ with equality iff $a = b$.",
    "Wait, I should double-check the case where the denominator vanishes.",
    "The sum of the first $n$ integers is $\\frac{n(n+1)}{2}$, hence the total is 210.",
    "Consider the triangle with sides 3, 4, 5; its area is $\\frac{1}{2} \\cdot 3 \\cdot 4 = 6$.",
    "Hmm, that contradicts the earlier bound, so let me recompute step by step.",
    "Taking everything modulo 7, we get $2^{3} \\equiv 1$, so the order of 2 is 3.",
]


def load_ground_truths(path: Path, k: int, rng: random.Random) -> tuple[list[str], str]:
    if path.is_file():
        import pandas as pd

        frame = pd.read_parquet(path, columns=["reward_model"])
        gts = [str(rm["ground_truth"]) for rm in frame["reward_model"]]
        picked = rng.sample(gts, min(k, len(gts)))
        picked += rng.choices(gts, k=k - len(picked))  # small sets repeat a few prompts
        return picked, f"{path.name} ({len(gts):,} rows)"
    return [rng.choice(FALLBACK_GTS) for _ in range(k)], "built-in list"


def equivalent_form(gt: str) -> str:
    """A differently written but equal answer, when an obvious one exists."""
    if gt.lstrip("-").isdigit():
        return f"{int(gt):,}" if abs(int(gt)) >= 1000 else f"${gt}$"
    return gt.replace("\\frac", "\\dfrac") if "\\frac" in gt else gt


def make_response(gt: str, rng: random.Random, style: str) -> str:
    body = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(25, 70)))
    roll = rng.random()
    if roll < 0.5:
        answer = gt
    elif roll < 0.7:
        answer = equivalent_form(gt)
    else:
        answer = str(rng.randint(0, 999))
    if style == "dapo":
        return f"{body}\n\nTherefore the final answer follows.\nAnswer: {answer}"
    if rng.random() < 0.5:
        return f"{body}\n\nSo the answer is $\\boxed{{{answer}}}$."
    return f"{body}\n\nAnswer: {answer}"


def bench_pool(grader: str, workers: int, batches: list, warmup: tuple) -> dict:
    """Median batch time over ``batches`` (new prompts each: caches start cold, as in RL)."""
    source = SOURCES[grader]
    with RewardPool(RewardConfig(num_workers=workers)) as pool:
        pool.wait_ready()
        pool.grade(warmup[0], warmup[1], [source] * len(warmup[0]))  # pipes, imports
        times, cpu, accs, failures = [], [], [], 0.0
        for responses, gts in batches:
            pids = [os.getpid(), *pool.worker_pids]
            cpu_start, start = cpu_seconds(pids), time.perf_counter()
            result = pool.grade(responses, gts, [source] * len(responses))
            times.append(time.perf_counter() - start)
            cpu.append(cpu_seconds(pids) - cpu_start)
            accs.append(sum(result.acc) / len(responses))
            failures += result.metrics["reward/timeouts"] + result.metrics["reward/errors"]
    return {
        "time": statistics.median(times),
        "cpu": statistics.median(cpu),
        "acc": statistics.mean(accs),
        "failures": failures,
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (Linux /proc), to read results under load."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def bench_inline(grader: str, batches: list) -> dict:
    score = dapo_rule.compute_score if grader == "dapo" else mv_rule.compute_score
    times, cpu, accs = [], [], []
    for responses, gts in batches:
        cpu_start, start = time.process_time(), time.perf_counter()
        acc = [score(r, g)["acc"] for r, g in zip(responses, gts)]
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        accs.append(sum(acc) / len(acc))
    return {
        "time": statistics.median(times),
        "cpu": statistics.median(cpu),
        "acc": statistics.mean(accs),
        "failures": 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--n", type=int, default=16, help="responses per prompt")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed batches (median)")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 120)
    rng = random.Random(args.seed)
    per_batch = args.prompts
    origins = []

    def make_batches(style: str) -> tuple[tuple, list]:
        path = args.data_dir / DEFAULT_DATA[style]
        all_gts, origin = load_ground_truths(path, per_batch * (args.repeats + 1), rng)
        origins.append(f"{style}: {origin}")
        batches = []
        for b in range(args.repeats + 1):
            gts = [gt for gt in all_gts[b * per_batch : (b + 1) * per_batch] for _ in range(args.n)]
            batches.append(([make_response(gt, rng, style) for gt in gts], gts))
        return batches[0], batches[1:]  # warm-up batch, timed batches

    data = {g: make_batches(g) for g in ("dapo", "math_verify")}
    sample = data["dapo"][1][0][0]
    n_items = len(sample)
    console.print(
        f"{n_items:,} responses per batch ({args.prompts} prompts x {args.n}), mean "
        f"{statistics.mean(map(len, sample)):,.0f} characters; {args.repeats} timed batches "
        f"with distinct prompts; ground truths: {'; '.join(origins)}; {available_cpus()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    table = Table(title="Reward grading throughput (median of repeats)")
    columns = ("grader", "mode", "workers", "items/s", "batch time (s)", "items/CPU-s", "acc")
    for col in (*columns, "failures", "target (2 cores)"):
        table.add_column(col, justify="left" if col in ("grader", "mode") else "right")
    ok = True
    for grader in ("dapo", "math_verify"):
        warmup, timed = data[grader]
        runs = []
        with console.status(f"{grader}: in-process baseline"):
            runs.append(("in-process, no isolation", "-", bench_inline(grader, timed)))
        for workers in args.workers:
            with console.status(f"{grader}: RewardPool with {workers} worker(s)"):
                runs.append(("RewardPool", workers, bench_pool(grader, workers, timed, warmup)))
        for mode, workers, row in runs:
            rate = n_items / row["time"]
            target = ""
            if workers == 2:
                met = rate >= TARGETS[grader]
                ok &= met
                target = f"{'[green]met' if met else '[red]missed'} (>= {TARGETS[grader]:,.0f})"
            per_cpu = n_items / row["cpu"] if row["cpu"] > 0 else float("nan")
            table.add_row(
                grader,
                mode,
                str(workers),
                f"{rate:,.0f}",
                f"{row['time']:.3f}",
                f"{per_cpu:,.0f}",
                f"{row['acc']:.3f}",
                f"{row['failures']:.0f}",
                target,
            )
    console.print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
