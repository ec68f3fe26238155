"""Supervised warm start of a tiny model on the synthetic arithmetic task.

Why: RL from a random init gets (almost) no reward on arithmetic and stalls; a few seconds
of SFT on prompt -> "expr=result\\nAnswer: result" lifts greedy accuracy enough that RL has
signal. Loss is on response tokens only (incl. EOS) so the model also learns to stop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from fipo_trainer.data.synthetic import (
    ArithmeticTask,
    is_correct,
    make_rows,
    make_sft_pairs,
    max_solution_chars,
)
from fipo_trainer.data.tokenization import prompt_ids

if TYPE_CHECKING:
    from fipo_trainer.data.tiny_model import TinyModelSettings

__all__ = ["greedy_accuracy", "prompt_ids", "sft_tensors", "warm_start"]

IGNORE = -100


def sft_tensors(
    tokenizer: Any, pairs: Sequence[tuple[list[dict[str, str]], str]]
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (labels only on the response + EOS)."""
    seqs, labels = [], []
    for messages, response in pairs:
        p = prompt_ids(tokenizer, messages)
        r = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        seqs.append(p + r)
        labels.append([IGNORE] * len(p) + r)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
    }


def warm_start(
    model: Any, tokenizer: Any, settings: TinyModelSettings, *, eval_prompts: int = 128
) -> dict[str, Any]:
    """Train ``model`` in place for ``settings.warm_start_steps`` AdamW steps (seeded).

    Returns losses, seconds and the greedy accuracy on ``eval_prompts`` held-out problems.
    """
    task = ArithmeticTask(
        digits=settings.task_digits, ops=tuple(settings.task_ops), solution=settings.task_solution
    )
    steps, bs = settings.warm_start_steps, settings.warm_start_batch_size
    data = sft_tensors(tokenizer, make_sft_pairs(steps * bs, seed=settings.seed, task=task))
    optim = torch.optim.AdamW(model.parameters(), lr=settings.warm_start_lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    # linear warm-up then linear decay to 10 %: stable at a high LR on a tiny model
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warmup, max(0.1, 1 - (s - warmup) / max(1, steps - warmup)))
    )
    model.train()
    start, losses = time.perf_counter(), []
    threads = torch.get_num_threads()
    # one thread: same float reductions wherever it runs (deterministic cache contents), and
    # faster than two for a model this small on a shared 2-core machine
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            for step in tqdm(range(steps), desc="tiny-model warm start", disable=None, leave=False):
                rows = slice(step * bs, (step + 1) * bs)
                batch = {k: v[rows] for k, v in data.items()}
                width = int(batch["attention_mask"].sum(1).max())
                batch = {k: v[:, :width] for k, v in batch.items()}
                loss = model(**batch).loss
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optim.step()
                sched.step()
                losses.append(loss.item())
        seconds = time.perf_counter() - start
        model.eval()
        accuracy = (
            greedy_accuracy(model, tokenizer, n=eval_prompts, task=task) if eval_prompts else None
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "steps": steps,
        "first_loss": losses[0],
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "seconds": seconds,
        "greedy_accuracy": accuracy,
        "eval_prompts": eval_prompts,
    }


@torch.no_grad()
def greedy_accuracy(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]] | None = None,
    *,
    n: int = 128,
    seed: int = 12345,
    task: ArithmeticTask | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
) -> float:
    """Fraction of rows whose greedy HF-generate answer line equals the ground truth.

    ``max_new_tokens=None``: 32, or the task's longest target (+8) when it is longer, so a
    long solution format is not cut off before its ``Answer:`` line.
    """
    if max_new_tokens is None:
        max_new_tokens = max(32, max_solution_chars(task or ArithmeticTask()) + 8)
    rows = list(rows) if rows is not None else make_rows(n, seed=seed, task=task, split="eval")
    pad = tokenizer.pad_token_id
    correct = 0
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids = [prompt_ids(tokenizer, r["prompt"]) for r in chunk]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = (torch.arange(width) >= torch.tensor([width - len(x) for x in ids])[:, None]).long()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        correct += sum(
            is_correct(t, r["reward_model"]["ground_truth"]) for t, r in zip(texts, chunk)
        )
    return correct / max(1, len(rows))
