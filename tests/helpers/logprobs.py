"""How close the engine's log-probs must be to the actor's, per the platform's dtype.

Why per dtype: in fp32 (CPU) the engine and the actor agree to rounding (< 1e-4). In bf16
(CUDA) the engine's token-by-token decode with a KV cache and the actor's one full forward
round differently. On the 8-layer tiny model of the sync tests the gap is 0.026 at most and
5e-4 on average, measured alike on CPU in bf16 and on an H100 (2026-12-05). Weights one
Adam step stale (lr 2e-3) differ by 0.12 at most and 0.013 on average. So bf16 bounds the
mean tightly (2e-3) and the worst token loosely (5e-2).
"""

from __future__ import annotations

import torch

#: dtype -> (max, mean) bound on |engine - actor| over response tokens
LOGPROB_BOUNDS = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 2e-3),
}


def logprob_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |a - b| over the tokens where ``mask`` is set."""
    keep = mask.bool()
    diff = (a.float() - b.float()).abs()[keep]
    return float(diff.max()), float(diff.mean())


def assert_logprobs_match(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None
) -> None:
    """Assert the gap is within ``dtype``'s bounds (default: the platform's dtype)."""
    if dtype is None:
        from fipo_trainer.platform import current_platform

        dtype = current_platform().dtype
    worst, mean = logprob_gap(a, b, mask)
    max_bound, mean_bound = LOGPROB_BOUNDS[dtype]
    assert worst < max_bound and mean < mean_bound, (
        f"log-prob gap max {worst:.2e} (bound {max_bound:.0e}), mean {mean:.2e} "
        f"(bound {mean_bound:.0e}) in {dtype}"
    )
