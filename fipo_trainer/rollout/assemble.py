"""Pure conversions between a prompt ``Batch`` and engine inputs/outputs.

Why separate from the worker: the canonical per-response layout (INTERFACES.md) is what
every later stage indexes into, so it is built and tested here without any engine.
Shapes are fixed per call: prompts keep the input batch's width (or the longest prompt),
responses are right-padded to ``response_length`` (= ``max_tokens``), so batches from
several rollout workers concatenate without re-padding.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
import torch

from fipo_trainer.data.batch import Batch
from fipo_trainer.rollout.base import FINISH_LENGTH, RolloutOutput

PROMPT_IDS_KEY = "prompt_token_ids"  # optional non-tensor input: list[int] per row
# Prompt-level tensors that the per-response layout replaces.
_PROMPT_TENSORS = ("input_ids", "attention_mask", "position_ids", "prompts")


def prompt_token_lists(batch: Batch) -> tuple[list[list[int]], int | None]:
    """Unpadded prompt ids per row, and the padded prompt width if the batch has one.

    Accepts ``prompt_token_ids`` (non-tensor, list of ints per row) or left-padded
    ``input_ids`` + ``attention_mask`` tensors (what the dataloader collates).
    """
    if PROMPT_IDS_KEY in batch.non_tensors:
        return [list(map(int, ids)) for ids in batch.non_tensors[PROMPT_IDS_KEY]], None
    if "input_ids" in batch.tensors and "attention_mask" in batch.tensors:
        ids, mask = batch.tensors["input_ids"].cpu(), batch.tensors["attention_mask"].cpu().bool()
        if ids.shape != mask.shape or ids.ndim != 2:
            raise ValueError(
                f"prompt input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} "
                "must be the same 2-D shape"
            )
        return [row[m].tolist() for row, m in zip(ids, mask)], int(ids.shape[1])
    raise ValueError(
        f"the prompt batch needs a non-tensor {PROMPT_IDS_KEY!r} field or left-padded "
        f"'input_ids' + 'attention_mask' tensors; it has {batch.keys()}"
    )


def assemble_responses(
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[RolloutOutput],
    *,
    n: int,
    pad_token_id: int,
    response_length: int,
    prompt_width: int | None = None,
) -> dict[str, torch.Tensor]:
    """Canonical per-response tensors (n consecutive rows per prompt)."""
    if len(outputs) != len(prompts) * n:
        raise ValueError(f"{len(outputs)} responses for {len(prompts)} prompts x n={n}")
    width = max((len(p) for p in prompts), default=0)
    if prompt_width is not None:
        if prompt_width < width:
            raise ValueError(
                f"prompt_width {prompt_width} is shorter than the longest prompt ({width})"
            )
        width = prompt_width
    rows = len(outputs)
    prompt_t = torch.full((rows, width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((rows, width), dtype=torch.long)
    resp_t = torch.full((rows, response_length), pad_token_id, dtype=torch.long)
    resp_mask = torch.zeros((rows, response_length), dtype=torch.long)
    logp = torch.zeros((rows, response_length), dtype=torch.float32)
    for row, out in enumerate(outputs):
        expected = row // n
        if out.prompt_index != expected:
            raise ValueError(
                f"response {row} belongs to prompt {out.prompt_index}, expected {expected}"
            )
        p = prompts[expected]
        if len(p):
            prompt_t[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            prompt_mask[row, width - len(p) :] = 1
        length = len(out.token_ids)
        if length > response_length:
            raise ValueError(
                f"response {row} has {length} tokens > response_length {response_length}"
            )
        if length:
            resp_t[row, :length] = torch.tensor(out.token_ids, dtype=torch.long)
            resp_mask[row, :length] = 1
            logp[row, :length] = torch.tensor(out.log_probs, dtype=torch.float32)
    attention_mask = torch.cat([prompt_mask, resp_mask], dim=1)
    return {
        "prompts": prompt_t,
        "responses": resp_t,
        "input_ids": torch.cat([prompt_t, resp_t], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        "response_mask": resp_mask.to(torch.float32),
        "rollout_log_probs": logp,
    }


def expand_non_tensors(batch: Batch, n: int) -> dict[str, np.ndarray]:
    """Per-prompt Python fields repeated n times; a fresh ``uid`` per prompt if missing."""
    fields = {k: v for k, v in batch.non_tensors.items() if k != PROMPT_IDS_KEY}
    if "uid" not in fields:
        fields["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
    return {k: np.repeat(v, n) for k, v in fields.items()}


def rollout_metrics(outputs: Sequence[RolloutOutput], seconds: float) -> dict[str, float]:
    """Throughput and length statistics of one generate call."""
    lengths = np.array([len(o.token_ids) for o in outputs], dtype=np.float64)
    tokens = float(lengths.sum()) if len(lengths) else 0.0
    return {
        "rollout/seconds": seconds,
        "rollout/responses": float(len(outputs)),
        "rollout/response_tokens": tokens,
        "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "rollout/response_length_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "rollout/response_length_max": float(lengths.max()) if len(lengths) else 0.0,
        "rollout/truncated_frac": (
            float(np.mean([o.finish_reason == FINISH_LENGTH for o in outputs])) if outputs else 0.0
        ),
    }


def build_rollout_batch(
    batch: Batch,
    outputs: Sequence[RolloutOutput],
    *,
    n: int,
    pad_token_id: int,
    response_length: int,
    response_text: Sequence[str],
    seconds: float = 0.0,
    prompt_width: int | None = None,
) -> Batch:
    """The per-response ``Batch`` for a prompt ``batch`` and the engine's outputs."""
    prompts, width = prompt_token_lists(batch)
    width = prompt_width or width
    tensors = assemble_responses(
        prompts,
        outputs,
        n=n,
        pad_token_id=pad_token_id,
        response_length=response_length,
        prompt_width=width,
    )
    extra_tensors = {
        k: t.repeat_interleave(n, dim=0)
        for k, t in batch.tensors.items()
        if k not in _PROMPT_TENSORS
    }
    non_tensors = expand_non_tensors(batch, n)
    non_tensors["response_text"] = np.array(list(response_text), dtype=object)
    non_tensors["finish_reason"] = np.array([o.finish_reason for o in outputs], dtype=object)
    meta = {**batch.meta, "rollout_metrics": rollout_metrics(outputs, seconds)}
    return Batch({**extra_tensors, **tensors}, non_tensors, meta)
