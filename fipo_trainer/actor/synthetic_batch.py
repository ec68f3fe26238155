"""Random rollout-shaped batches for tests and benchmarks of the actor.

Why: actor tests must not depend on a rollout engine, yet need exactly the layout the
rollout produces (left-padded prompts, right-padded responses, varied lengths, n responses
per prompt sharing a uid, GRPO-style advantages constant over each response).
"""

from __future__ import annotations

import torch

from fipo_trainer.data.batch import Batch


def random_rollout_batch(
    *,
    num_prompts: int,
    n: int,
    vocab_size: int,
    pad_id: int = 0,
    prompt_width: int = 16,
    response_width: int = 24,
    min_prompt_len: int = 4,
    min_response_len: int = 1,
    seed: int = 0,
    prompt_lengths: list[int] | None = None,
    response_lengths: list[int] | None = None,
) -> Batch:
    """``num_prompts * n`` rows with the canonical rollout fields plus ``advantages``.

    ``prompt_lengths`` (one per prompt) and ``response_lengths`` (one per row) fix the
    lengths instead of drawing them (e.g. to place a response across a shard boundary)."""
    g = torch.Generator().manual_seed(seed)
    rows = num_prompts * n
    prompt_lens = torch.randint(min_prompt_len, prompt_width + 1, (num_prompts,), generator=g)
    if prompt_lengths is not None:
        prompt_lens = torch.as_tensor(prompt_lengths, dtype=torch.long)
    prompt_lens = prompt_lens.repeat_interleave(n)
    resp_lens = torch.randint(min_response_len, response_width + 1, (rows,), generator=g)
    if response_lengths is not None:
        resp_lens = torch.as_tensor(response_lengths, dtype=torch.long)
    prompt_tokens = torch.randint(0, vocab_size, (num_prompts, prompt_width), generator=g)
    prompt_tokens = prompt_tokens.repeat_interleave(n, dim=0)
    resp_tokens = torch.randint(0, vocab_size, (rows, response_width), generator=g)
    cols_p = torch.arange(prompt_width)[None]
    cols_r = torch.arange(response_width)[None]
    prompt_mask = cols_p >= (prompt_width - prompt_lens)[:, None]
    response_mask = cols_r < resp_lens[:, None]
    prompts = torch.where(prompt_mask, prompt_tokens, pad_id)
    responses = torch.where(response_mask, resp_tokens, pad_id)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    scores = torch.randn(num_prompts, n, generator=g)
    adv = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-6)
    advantages = adv.reshape(rows, 1) * response_mask.float()
    uids = [f"p{i // n}" for i in range(rows)]
    return Batch(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response_mask": response_mask.float(),
            "advantages": advantages,
        },
        {"uid": uids},
        {"rollout_n": n},
    )
