"""Micro-batch planning (token budget, balanced) and padding-free packing of rows.

Why packing: a rollout batch is left-padded prompts + right-padded responses; most of a
padded [rows, P+R] tensor can be padding. Each micro-batch here is one row of real tokens
back to back with per-sequence position ids (transformers builds a block-diagonal causal
mask from them, flash-attention uses varlen kernels), and logits are computed only at the
positions that predict response tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fipo_trainer.cluster.dispatch import balanced_partition


def plan_token_budget(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    min_micro_batches: int = 1,
    budget_key: str = "actor.ppo_max_token_len_per_gpu",
) -> list[list[int]]:
    """Split rows into as few micro-batches as fit ``max_tokens`` each (at least
    ``min_micro_batches``), balancing token counts; bins ordered by first row index."""
    n = len(lengths)
    if n == 0:
        return []
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(
            f"a sequence of {longest} tokens does not fit {budget_key}={max_tokens}; "
            "set it to at least max_prompt_length + max_response_length"
        )
    k = min(n, max(min_micro_batches, math.ceil(sum(lengths) / max_tokens)))
    while True:
        parts = balanced_partition(lengths, k)
        if k == n or max(sum(lengths[i] for i in p) for p in parts) <= max_tokens:
            return sorted(parts, key=lambda p: p[0])
        k += 1


def plan_fixed_size(n: int, size: int) -> list[list[int]]:
    """Consecutive micro-batches of ``size`` rows (the last may be shorter)."""
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


@dataclass
class PackedRows:
    """Rows packed into one padding-free sequence."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logit_positions: torch.Tensor  # [K] positions whose logits predict response tokens
    targets: torch.Tensor  # [K] the response tokens
    response_lengths: list[int]  # real response tokens per row (sum = K)
    # Sequence parallel: this is one rank's piece; the whole padded sequence's position ids
    # (the Ulysses attention runs over all of it, see actor.sequence_parallel).
    sequence_position_ids: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> PackedRows:
        return PackedRows(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.logit_positions.to(device),
            self.targets.to(device),
            self.response_lengths,
            None if self.sequence_position_ids is None else self.sequence_position_ids.to(device),
        )


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
) -> PackedRows:
    """Pack rows of ``input_ids`` [n, P+R] (prompts left-padded to P, responses
    right-padded) into one sequence of their real tokens."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} differ in shape"
        )
    mask = attention_mask.bool()
    prompt_lens = mask[:, :prompt_width].sum(-1)
    resp_lens = mask[:, prompt_width:].sum(-1)
    ids, pos, logit_pos, targets = [], [], [], []
    offset = 0
    for i in range(input_ids.shape[0]):
        p, r = int(prompt_lens[i]), int(resp_lens[i])
        if p == 0:
            raise ValueError(f"row {i} has an empty prompt (attention_mask is 0 on all of it)")
        if r and not bool(mask[i, prompt_width : prompt_width + r].all()):
            raise ValueError(
                f"row {i}: responses must be right-padded (attention_mask 1...1 0...0 after "
                "the prompt)"
            )
        real = input_ids[i][mask[i]]
        ids.append(real)
        pos.append(torch.arange(real.shape[0], dtype=torch.long))
        # Token at packed index offset+p+j is predicted by the logits at offset+p+j-1.
        logit_pos.append(torch.arange(offset + p - 1, offset + p - 1 + r, dtype=torch.long))
        targets.append(real[p : p + r])
        offset += real.shape[0]
    return PackedRows(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(pos)[None],
        logit_positions=torch.cat(logit_pos),
        targets=torch.cat(targets).long(),
        response_lengths=[int(r) for r in resp_lens],
    )


def unpack_to_rows(
    values: torch.Tensor, response_lengths: Sequence[int], width: int
) -> torch.Tensor:
    """[K] per-response-token values -> [n, width], zero after each row's response."""
    n = len(response_lengths)
    lengths = torch.as_tensor(list(response_lengths), dtype=torch.long, device=values.device)
    cols = torch.arange(width, device=values.device)
    valid = cols[None, :] < lengths[:, None]
    out = values.new_zeros(n, width)
    # Boolean-mask assignment fills row-major order, matching the packed order.
    return out.masked_scatter(valid, values)
