"""Per-token log-probs (and entropy) from logits, in fp32, one vocab chunk at a time.

Why a custom autograd function: ``log_softmax(logits.float())`` keeps a full fp32
[tokens, vocab] copy alive for backward (for a 150k vocab and 20k tokens that is 12 GB).
Here forward keeps only the logits as given (bf16 on GPU) and the fp32 log-sum-exp per
token; backward recomputes softmax chunk by chunk. Forward runs the same code with and
without grad, so no-grad "old" log-probs and training log-probs agree bitwise.
"""

from __future__ import annotations

import torch


class _TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_size, with_entropy):  # type: ignore[override]
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        ent = torch.empty(n, dtype=torch.float32, device=logits.device) if with_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            x = logits[s:e].float()
            if temperature != 1.0:
                x = x / temperature
            chunk_lse = torch.logsumexp(x, dim=-1)
            lse[s:e] = chunk_lse
            logp[s:e] = x.gather(-1, targets[s:e, None]).squeeze(-1) - chunk_lse
            if ent is not None:
                probs = torch.exp(x - chunk_lse[:, None])
                ent[s:e] = chunk_lse - (probs * x).sum(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):  # type: ignore[override]
        if grad_logp is None:
            return None, None, None, None, None
        logits, targets, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            e = min(s + chunk, logits.shape[0])
            x = logits[s:e].float()
            if t != 1.0:
                x = x / t
            g = grad_logp[s:e, None].float()
            gx = torch.exp(x - lse[s:e, None]).mul_(-g)  # d logp / dx = onehot - softmax
            gx.scatter_add_(-1, targets[s:e, None], g)
            if t != 1.0:
                gx = gx / t
            grad[s:e] = gx.to(logits.dtype)
        return grad, None, None, None, None


def token_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[target] per row, fp32; plus entropy (no grad) if asked.

    ``logits``: [K, V] (any float dtype), ``targets``: [K] token ids.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [K, V] and targets [K], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"log-prob temperature must be > 0, got {temperature}")
    logp, ent = _TokenLogProb.apply(
        logits, targets.long(), float(temperature), int(chunk_size), bool(with_entropy)
    )
    return logp, ent
