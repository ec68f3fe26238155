"""Ulysses sequence parallel on CPU: SP 1 vs SP 2 on one long packed sequence.

A wider tiny Qwen2 (hidden 256, 8 heads of 32) runs the FIPO update of one mini-batch
whose rows pack into a single sequence of ``--tokens`` tokens, on real DeepSpeed ranks
(ZeRO-2, gloo): 1 rank at SP 1, then 2 ranks = 1 data-parallel group at SP 2, one after
the other so each has the machine to itself. Per configuration it reports:

- peak activation memory per rank: resident memory sampled every millisecond during the
  update, minus the resident memory just before it (glibc's mmap threshold is fixed so
  freed activations leave the process); after a first update, which allocates what stays
  (ZeRO's buckets, Adam's state);
- step seconds: the update's wall time (median of ``--repeats`` after that first update);
- max gradient difference vs SP 1: the full, rank-averaged gradient at the optimizer step;
- Future-KL share: time inside FIPO's influence weights (Future-KL, its cross-shard
  stitching and the clipping) over the update time, on the rank that spends least there
  (the others' time includes waiting at the stitching all-gather for that rank).

    .venv/bin/python scripts/bench_sequence_parallel.py             # 4096 tokens
    .venv/bin/python scripts/bench_sequence_parallel.py --tokens 8192

The last line is ``SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

PROMPT = 64
ROWS = 2  # responses packed into the one sequence (1 prompt x n = 2)


# ----------------------------------------------------------------------------- in the workers
def start_probes(worker: Any) -> None:
    """Memory sampler + timer around influence weights + gradient capture (benchmark only)."""
    import psutil
    from deepspeed.utils import safe_get_full_grad

    from fipo_trainer.algorithms import policy_loss

    proc = psutil.Process()
    worker.bench = {"fkl_s": 0.0, "grads": None}
    if not hasattr(policy_loss, "_bench_original_iw"):
        policy_loss._bench_original_iw = policy_loss.influence_weights

    def timed(*args: Any, **kwargs: Any):
        t0 = time.perf_counter()
        out = policy_loss._bench_original_iw(*args, **kwargs)
        worker.bench["fkl_s"] += time.perf_counter() - t0
        return out

    policy_loss.influence_weights = timed
    engine = worker.engine
    step = type(engine).step

    def capturing_step(grad_scale: float = 1.0) -> float:
        worker.bench["grads"] = {
            n: safe_get_full_grad(p).detach().double().cpu() * grad_scale
            for n, p in engine.module.named_parameters()
        }
        return step(engine, grad_scale)

    engine.step = capturing_step
    worker.bench["base_rss"] = proc.memory_info().rss
    worker.bench["peak_rss"] = worker.bench["base_rss"]
    worker.bench["stop"] = threading.Event()

    def sample() -> None:
        while not worker.bench["stop"].is_set():
            worker.bench["peak_rss"] = max(worker.bench["peak_rss"], proc.memory_info().rss)
            time.sleep(0.001)

    worker.bench["thread"] = threading.Thread(target=sample, daemon=True)
    worker.bench["thread"].start()


def stop_probes(worker: Any) -> dict[str, Any]:
    b = worker.bench
    b["stop"].set()
    b["thread"].join()
    return {
        "activation_mb": (b["peak_rss"] - b["base_rss"]) / 2**20,
        "fkl_s": b["fkl_s"],
        "grads": b["grads"] if worker.rank == 0 else None,
    }


# ----------------------------------------------------------------------------- driver
def long_batch(tokens: int, vocab: int):
    from fipo_trainer.actor.synthetic_batch import random_rollout_batch

    response = tokens // ROWS - PROMPT
    return random_rollout_batch(
        num_prompts=1,
        n=ROWS,
        vocab_size=vocab,
        prompt_width=PROMPT,
        response_width=response,
        prompt_lengths=[PROMPT],
        response_lengths=[response] * ROWS,
        seed=0,
    )


def off_policy(batch, old: torch.Tensor):
    from fipo_trainer.data.batch import Batch

    g = torch.Generator().manual_seed(1)
    shifted = old + 0.2 * torch.randn(old.shape, generator=g) * batch["response_mask"]
    return batch.union(Batch({"old_log_probs": shifted}))


def run_config(model_path: str, sp: int, tokens: int, repeats: int, batch) -> dict[str, Any]:
    from fipo_trainer.actor import ActorConfig, ActorGroup
    from fipo_trainer.actor.worker import DeepSpeedActorWorker

    cfg = ActorConfig(
        model_path=model_path,
        zero_stage=2,
        lr=1e-4,
        lr_warmup_steps=0,
        ppo_mini_batch_size=1,
        ppo_max_token_len_per_gpu=tokens // sp,
        loss_name="fipo",
        ulysses_sequence_parallel_size=sp,
    )
    group = ActorGroup(cfg, sp, name=f"bench-sp{sp}")
    try:
        run = DeepSpeedActorWorker.run
        if "old_log_probs" not in batch:
            old = group.compute_log_prob(batch, temperature=1.0)["old_log_probs"]
            batch = off_policy(batch, old)
        ckpt = group.save(os.path.join(os.environ["BENCH_TMP"], f"sp{sp}"))
        # Gradients: the first update. It also allocates what stays (ZeRO buckets, Adam
        # state), so the repeats below measure activations only.
        group.worker_group.call_all(run, start_probes)
        group.update(batch, temperature=1.0, global_step=1)
        probes = group.worker_group.call_all(run, stop_probes)
        times, shares, memory = [], [], []
        for _ in range(repeats):
            group.load(ckpt)
            group.worker_group.call_all(run, start_probes)
            metrics = group.update(batch, temperature=1.0, global_step=1)
            timing = group.worker_group.call_all(run, stop_probes)
            update_s = metrics["actor/update_time_s"]
            times.append(update_s)
            # min over ranks: the rank that reaches the all-gather last does not wait in
            # it, so its time is the work (a faster rank's also holds the wait for it).
            shares.append(min(t["fkl_s"] for t in timing) / update_s)
            memory.append(max(t["activation_mb"] for t in timing))
        return {
            "sp": sp,
            "activation_mb": statistics.median(memory),
            "step_s": statistics.median(times),
            "future_kl_share": statistics.median(shares),
            "grads": probes[0]["grads"],
            "batch": batch,
            "tokens": metrics["actor/tokens"],
        }
    finally:
        group.shutdown()


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) / max(float(a[k].abs().max()), 1e-12) for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="packed sequence length")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    # Freed activations go back to the OS at once, so resident memory tracks live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    import tempfile

    from fipo_trainer.cluster import init_ray, shutdown_ray
    from fipo_trainer.data.tiny_model import build_tiny_model

    console = Console(stderr=True)
    model = build_tiny_model(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        head_dim=32,
        max_position_embeddings=max(8192, args.tokens),
    )
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model)
    batch = long_batch(args.tokens, hf.vocab_size)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BENCH_TMP"] = tmp
        init_ray(num_cpus=2)
        try:
            for sp in (1, 2):
                console.log(f"SP {sp}: {args.tokens} tokens, {hf.num_attention_heads} heads")
                res = run_config(str(model), sp, args.tokens, args.repeats, batch)
                batch = res["batch"]  # the SP 2 run reuses SP 1's old log-probs
                results.append(res)
        finally:
            shutdown_ray()
    one, two = results
    grad_diff = max_rel_diff(one["grads"], two["grads"])
    table = Table(title=f"Ulysses SP on CPU: {int(one['tokens'])} packed tokens, "
                  f"hidden {hf.hidden_size}, {hf.num_attention_heads} heads, "
                  f"{hf.num_hidden_layers} layers")  # fmt: skip
    for col in ("config", "ranks", "activation MB / rank", "step s", "max grad rel diff",
                "Future-KL share"):  # fmt: skip
        table.add_column(col, justify="right")
    for res, diff in ((one, 0.0), (two, grad_diff)):
        table.add_row(
            f"SP {res['sp']}",
            str(res["sp"]),
            f"{res['activation_mb']:.0f}",
            f"{res['step_s']:.2f}",
            "(reference)" if res is one else f"{diff:.2e}",
            f"{100 * res['future_kl_share']:.2f}%",
        )
    Console().print(table)
    summary = {
        "tokens": int(one["tokens"]),
        "max_grad_rel_diff": grad_diff,
        "peak_mem_ratio_sp2_vs_sp1": two["activation_mb"] / one["activation_mb"],
        "step_time_ratio_sp2_vs_sp1": two["step_s"] / one["step_s"],
        "future_kl_share": max(one["future_kl_share"], two["future_kl_share"]),
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
