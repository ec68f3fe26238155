"""Benchmark: a packed row's attention as one padded sdpa call vs one call per sequence.

Forward + backward of a 2-layer Qwen2 through the actor's packed attention
(``actor/ulysses.py`` → ``actor/varlen_sdpa.py``), one thread, for several length mixes:
the padded call against the per-sequence loop. The actor pads where the padding's extra
query-key pairs per saved call stay within ``PAIRS_PER_CALL``; the "rule" column says which
the actor picks for each mix; the last column is the largest logit difference.
Usage: python scripts/bench_varlen_sdpa.py [--hidden 64 256] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import Qwen2Config, Qwen2ForCausalLM

from fipo_trainer.actor import ulysses, varlen_sdpa

#: (shortest, longest, sequences): the quickstart's rows first, then longer and mixed ones.
MIXES = ((17, 39, 40), (20, 130, 16), (100, 130, 10), (10, 300, 8), (200, 1000, 4))


def _model(hidden: int) -> Qwen2ForCausalLM:
    heads = max(1, hidden // 32)
    config = Qwen2Config(
        vocab_size=262, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=32,
        attn_implementation=ulysses.install("sdpa"),
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def _time(model, ids, pos, pairs_per_call: float, reps: int) -> tuple[float, torch.Tensor]:
    varlen_sdpa.PAIRS_PER_CALL = pairs_per_call

    def step() -> torch.Tensor:
        ulysses.set_sequence(pos)
        logits = model(input_ids=ids, position_ids=pos).logits
        logits.float().pow(2).mean().backward()
        return logits.detach()

    logits = step()  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps * 1e3, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ulysses.set_group(None, 1, 0)
    rule = varlen_sdpa.PAIRS_PER_CALL
    table = Table(title="packed attention, forward + backward, 2 layers, 1 thread")
    for column in ("hidden", "seqs", "lengths", "extra pairs / call", "rule", "loop ms",
                   "padded ms", "loop / padded", "max |Δ logits|"):  # fmt: skip
        table.add_column(column, justify="right")
    rows = []
    for hidden in args.hidden:
        model = _model(hidden)
        rng = random.Random(0)
        for shortest, longest, count in MIXES:
            lengths = [rng.randint(shortest, longest) for _ in range(count)]
            pos = torch.cat([torch.arange(n) for n in lengths])[None]
            ids = torch.randint(0, 262, pos.shape)
            extra = count * max(lengths) ** 2 - sum(n * n for n in lengths)
            per_call = extra / (count - 1)
            picks = "padded" if per_call <= rule else "loop"
            loop_ms, loop_logits = _time(model, ids, pos, 0.0, args.reps)
            padded_ms, padded_logits = _time(model, ids, pos, float("inf"), args.reps)
            diff = (loop_logits - padded_logits).abs().max().item()
            rows.append({"hidden": hidden, "sequences": count, "pairs_per_call": round(per_call),
                         "rule": picks,
                         "loop_ms": round(loop_ms, 2), "padded_ms": round(padded_ms, 2),
                         "max_abs_diff": diff})  # fmt: skip
            table.add_row(str(hidden), str(count), f"{shortest}–{longest}", f"{per_call:.0f}", picks,
                          f"{loop_ms:.1f}", f"{padded_ms:.1f}", f"{loop_ms / padded_ms:.2f}×",
                          f"{diff:.1e}")  # fmt: skip
    Console().print(table)
    varlen_sdpa.PAIRS_PER_CALL = rule
    print("SUMMARY " + json.dumps({"pairs_per_call": rule, "rows": rows}))


if __name__ == "__main__":
    main()
