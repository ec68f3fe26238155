"""Future-KL: the discounted sum of the policy shift over the rest of a response.

F_t = sum_{k >= t} gamma^(k - t) * mask_k * log_ratio_k      (FIPO_SPEC.md §1 point 4)

`future_kl` computes it exactly in O(B·L) work and memory with a blocked reverse scan:
inside a block of K tokens a (B, K) x (K, K) matmul against a decay matrix gives the
block-local sums; block boundaries are stitched together by the same scan, recursively, on
the much shorter sequence of block heads with decay gamma^K. Only non-negative powers of
gamma appear, so nothing overflows at L = 20480 (gamma^(-t) would).
`future_kl_reference` is the published chunked O(B·L²) form, kept for tests and benchmarks.
`combine_sharded_future_kl` stitches results when the sequence axis is split across
sequence-parallel ranks.
"""

from __future__ import annotations

import math

import torch

DEFAULT_BLOCK_SIZE = 64


def gamma_from_half_life(decay_rate: float) -> float:
    """gamma = 2^(-1/tau): a token tau positions later counts half as much."""
    if not decay_rate > 0:
        raise ValueError(f"decay_rate (half-life in tokens) must be > 0, got {decay_rate}")
    return 2.0 ** (-1.0 / decay_rate)


def _check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")


def _decay_powers(exponents: torch.Tensor, gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """gamma ** exponents for non-negative integer exponents, computed in float64."""
    base = torch.tensor(gamma, dtype=torch.float64, device=exponents.device)
    return torch.pow(base, exponents.to(torch.float64)).to(dtype)


def _intra_block_decay(block: int, gamma: float, dtype: torch.dtype, device) -> torch.Tensor:
    """M[j, i] = gamma^(j - i) for j >= i else 0, so (x @ M)[i] = sum_{j>=i} gamma^(j-i) x_j."""
    idx = torch.arange(block, device=device)
    dist = idx[:, None] - idx[None, :]
    return torch.where(dist >= 0, _decay_powers(dist.clamp(min=0), gamma, dtype), 0)


def discounted_reverse_cumsum(
    values: torch.Tensor, gamma: float, block_size: int = DEFAULT_BLOCK_SIZE
) -> torch.Tensor:
    """y_t = sum_{k >= t} gamma^(k - t) x_k along the last axis of a [B, L] tensor, in O(B·L)."""
    _check_gamma(gamma)
    if block_size < 2:
        raise ValueError(
            f"block_size must be >= 2 (the scan recurses on L / block), got {block_size}"
        )
    if values.dim() != 2:
        raise ValueError(f"expected a [batch, length] tensor, got shape {tuple(values.shape)}")
    batch, length = values.shape
    if length == 0:
        return values.clone()
    block = min(block_size, length)
    n_blocks = math.ceil(length / block)
    padded = torch.nn.functional.pad(values, (0, n_blocks * block - length))  # zeros add nothing
    blocks = padded.view(batch, n_blocks, block)
    local = blocks @ _intra_block_decay(block, gamma, values.dtype, values.device)
    if n_blocks > 1:
        # F at each block's first token, stitched across blocks with decay gamma^block.
        heads = discounted_reverse_cumsum(local[:, :, 0], gamma**block, block_size)
        carry_in = torch.zeros_like(heads)
        carry_in[:, :-1] = heads[:, 1:]  # F at the first token of the next block
        to_block_end = _decay_powers(
            block - torch.arange(block, device=values.device), gamma, values.dtype
        )  # gamma^(block - i)
        local = local + carry_in[:, :, None] * to_block_end
    return local.reshape(batch, n_blocks * block)[:, :length]


def masked_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """D_t = log_ratio_t * mask_t (mask: bool or float, the caller's combined mask)."""
    if log_ratio.shape != mask.shape:
        raise ValueError(
            f"log_ratio shape {tuple(log_ratio.shape)} != mask shape {tuple(mask.shape)}"
        )
    return log_ratio * mask.to(log_ratio.dtype)


def future_kl(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Exact Future-KL F[B, L] in O(B·L); `mask` = response ∧ participation (bool or float)."""
    return discounted_reverse_cumsum(masked_log_ratio(log_ratio, mask), gamma, block_size)


def future_kl_reference(
    log_ratio: torch.Tensor, mask: torch.Tensor, gamma: float, chunk_size: int = 128
) -> torch.Tensor:
    """The published chunked form: (B, K) x (K, L) against decay blocks. O(B·L²) time."""
    _check_gamma(gamma)
    kl = masked_log_ratio(log_ratio, mask)
    length = kl.shape[-1]
    out = torch.zeros_like(kl)
    positions = torch.arange(length, device=kl.device)
    for start in range(0, length, chunk_size):
        stop = min(length, start + chunk_size)
        k_idx = torch.arange(start, stop, device=kl.device)
        dist = k_idx[:, None] - positions[None, :]  # (K, L): k - t
        decay = torch.where(dist >= 0, _decay_powers(dist.clamp(min=0), gamma, kl.dtype), 0)
        out += kl[:, start:stop] @ decay
    return out


def shard_carries(
    heads: torch.Tensor, lengths: list[int] | torch.Tensor, gamma: float
) -> torch.Tensor:
    """Discounted sum that later shards carry into each shard's last token + 1.

    heads[:, r] is shard r's *local* Future-KL at its first token (each rank all-gathers
    these B scalars); lengths[r] (or lengths[:, r], per row) its token count. Returns
    carries[:, r] = true F at the first token of shard r + 1 (0 for the last shard). A row
    with no token on shard r has head 0 and length 0 there: the carry passes through.
    """
    _check_gamma(gamma)
    n_shards = heads.shape[1] if heads.dim() == 2 else -1
    lengths = torch.as_tensor(lengths, device=heads.device)
    if lengths.dim() == 1:
        lengths = lengths.expand(heads.shape[0], -1) if heads.dim() == 2 else lengths
    if heads.dim() != 2 or lengths.shape != heads.shape:
        raise ValueError(
            f"heads must be [batch, n_shards] and lengths [n_shards] or [batch, n_shards], got "
            f"{tuple(heads.shape)} and {tuple(lengths.shape)}"
        )
    decay = _decay_powers(lengths, gamma, heads.dtype)
    carries = torch.zeros_like(heads)
    running = torch.zeros_like(heads[:, 0])  # true F at the first token of shard r + 1
    for r in range(n_shards - 1, -1, -1):
        carries[:, r] = running
        running = heads[:, r] + decay[:, r] * running
    return carries


def combine_sharded_future_kl(
    local_future_kl: torch.Tensor,
    carry_in: torch.Tensor,
    gamma: float,
    shard_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact Future-KL of one shard: local result + gamma^(distance to shard end) · carry_in.

    ``shard_end`` [B]: the column after each row's shard (default: the tensor's length, i.e.
    the tensor is the shard). Columns at or after it get no carry.
    """
    _check_gamma(gamma)
    length = local_future_kl.shape[-1]
    cols = torch.arange(length, device=local_future_kl.device)
    if shard_end is None:
        distance = (length - cols)[None, :]
    else:
        distance = shard_end.to(cols.device)[:, None] - cols[None, :]
    to_end = torch.where(
        distance > 0,
        _decay_powers(distance.clamp(min=0), gamma, local_future_kl.dtype),
        0,
    )
    return local_future_kl + carry_in.to(local_future_kl.dtype)[:, None] * to_end
