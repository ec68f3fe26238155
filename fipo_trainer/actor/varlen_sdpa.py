"""Block-diagonal causal attention over a packed row, as one sdpa call on padded sequences.

The CPU (and no-flash-attn) analogue of varlen flash attention. Looping sdpa over the packed
sequences costs one kernel launch per sequence per layer, forward and backward: on the CPU
quickstart a packed row holds ~40 sequences of ~30 tokens and the loop was most of the
attention time. Here the sequences are gathered into a right-padded ``[N, L_max]`` batch and
attend with sdpa's ``is_causal``: a real query at position i sees only keys 0..i of its own
sequence, all real, so its output is exactly the per-sequence one; pad queries' outputs are
dropped (zero gradient), and pad keys are only ever seen by pad queries.

Padding adds ``N * L_max^2 - sum(L_i^2)`` query-key pairs of work and saves ``N - 1`` calls;
rows where the extra work outweighs the calls (few long sequences, or one long CoT among
short ones) keep the loop (:data:`PAIRS_PER_CALL`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Padded query-key pairs one saved sdpa call pays for. ``scripts/bench_varlen_sdpa.py`` on
#: CPU (2 layers, one thread): a call's overhead is worth 4.4k pairs at hidden 64 and 8.2k at
#: 256; 40 sequences of 17-39 tokens run 1.17-1.38x faster padded, 16 of 20-130 no faster.
PAIRS_PER_CALL = 4096


@dataclass(frozen=True)
class PaddedLayout:
    """Where each packed token goes in the padded batch and back."""

    gather: torch.Tensor  # [N, L_max] packed index of each padded slot (pads: their sequence's start)
    scatter: torch.Tensor  # [T] flat padded slot of each packed token
    num_sequences: int
    max_length: int


def padded_layout(spans: Sequence[tuple[int, int]], device: torch.device) -> PaddedLayout | None:
    """The layout for ``[start, end)`` spans covering a packed row, or None when the padding's
    extra work exceeds :data:`PAIRS_PER_CALL` per saved call (or there is one sequence)."""
    lengths = [b - a for a, b in spans]
    if len(spans) < 2:
        return None
    max_length = max(lengths)
    extra = len(spans) * max_length**2 - sum(n * n for n in lengths)
    if extra > PAIRS_PER_CALL * (len(spans) - 1):
        return None
    starts = torch.tensor([a for a, _ in spans], dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.arange(max_length, dtype=torch.long)
    real = offsets[None, :] < lens[:, None]
    gather = torch.where(real, starts[:, None] + offsets[None, :], starts[:, None])
    slots = torch.arange(len(spans) * max_length, dtype=torch.long).view(len(spans), max_length)
    return PaddedLayout(
        gather=gather.to(device),
        scatter=slots[real].to(device),  # row-major over real slots = packed token order
        num_sequences=len(spans),
        max_length=max_length,
    )


def padded_causal_attention(
    inner: Callable[..., Any],
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PaddedLayout,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """``inner`` (transformers' sdpa attention) over the padded batch: q/k/v ``[B, H, T, D]``
    in, ``[B, T, H, D]`` out, as the per-sequence loop returns it."""
    batch = query.shape[0]
    n, length = layout.num_sequences, layout.max_length

    def pad(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [B * N, H, L_max, D]
        heads, dim = x.shape[1], x.shape[3]
        y = x[:, :, layout.gather]  # [B, H, N, L_max, D]
        return y.permute(0, 2, 1, 3, 4).reshape(batch * n, heads, length, dim)

    out = inner(module, pad(query), pad(key), pad(value), None, **kwargs)[0]  # [B*N, L, H, D]
    heads, dim = out.shape[2], out.shape[3]
    return out.reshape(batch, n * length, heads, dim)[:, layout.scatter]
