"""Pure conversions between a prompt ``Batch`` and engine inputs/outputs.

Why separate from the worker: the per-response layout (``data/schema.py``, stage
``generate``) is what every later stage indexes into, so it is built and tested here without
any engine. Shapes are fixed per call: prompts keep the input batch's width (or the longest
prompt), responses are right-padded to ``response_length`` (= ``max_tokens``), so batches
from several rollout workers concatenate without re-padding. Workers build the tensors;
the driver adds the prompt's own fields (``expand_prompt_fields``), which never travel to
the workers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
import torch

from fipo_trainer.data.batch import Batch
from fipo_trainer.data.schema import GENERATE_READS, PROMPT_OBJECT_FIELDS
from fipo_trainer.rollout.base import RolloutOutput

PROMPT_IDS_KEY = "prompt_token_ids"  # optional non-tensor input: list[int] per row


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
    """Per-response tensors (n consecutive rows per prompt): responses, input_ids,
    attention_mask, response_mask, rollout_log_probs, rollout_weight_version (-1 on padding
    and where the output carries no versions)."""
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
    versions = torch.full((rows, response_length), -1, dtype=torch.long)
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
            if out.versions:
                versions[row, :length] = torch.tensor(out.versions, dtype=torch.long)
    return {
        "responses": resp_t,
        "input_ids": torch.cat([prompt_t, resp_t], dim=1),
        "attention_mask": torch.cat([prompt_mask, resp_mask], dim=1),
        "response_mask": resp_mask.to(torch.float32),
        "rollout_log_probs": logp,
        "rollout_weight_version": versions,
    }


def generate_inputs(prompts: Batch) -> Batch:
    """The part of a prompt batch a rollout worker reads (token ids only)."""
    if PROMPT_IDS_KEY in prompts.non_tensors:
        return prompts.select(PROMPT_IDS_KEY, meta=False)
    return prompts.select(*GENERATE_READS, meta=False)


def expand_prompt_fields(prompts: Batch, n: int) -> Batch:
    """The prompt-level object fields (``schema.PROMPT_OBJECT_FIELDS``) repeated n times;
    a fresh ``uid`` per prompt if the batch has none."""
    fields = {k: prompts.non_tensors[k] for k in PROMPT_OBJECT_FIELDS if k in prompts.non_tensors}
    if "uid" not in fields:
        fields["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(prompts))], dtype=object)
    return Batch(non_tensors={k: np.repeat(v, n) for k, v in fields.items()})


def rollout_metrics(outputs: Sequence[RolloutOutput], seconds: float) -> dict[str, float]:
    """What one generate call did (the group adds these up across workers)."""
    return {
        "rollout/seconds": seconds,
        "rollout/responses": float(len(outputs)),
        "rollout/response_tokens": float(sum(len(o.token_ids) for o in outputs)),
    }


def build_rollout_batch(
    prompts: Batch,
    outputs: Sequence[RolloutOutput],
    *,
    n: int,
    pad_token_id: int,
    response_length: int,
    response_text: Sequence[str],
    prompt_width: int | None = None,
) -> Batch:
    """The ``generate`` fields (``data/schema.py``) for a prompt batch and engine outputs."""
    token_lists, width = prompt_token_lists(prompts)
    tensors = assemble_responses(
        token_lists,
        outputs,
        n=n,
        pad_token_id=pad_token_id,
        response_length=response_length,
        prompt_width=prompt_width or width,
    )
    return Batch(tensors, {"response_text": np.array(list(response_text), dtype=object)})
