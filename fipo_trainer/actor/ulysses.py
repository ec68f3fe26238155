"""Ulysses sequence-parallel attention for HF models that use transformers' attention interface.

Each rank of an SP group of size k runs the model on one contiguous 1/k shard of a padding-free packed row. Everything
outside attention is token-local, so only attention needs the other shards: we all-to-all q/k/v from
"my tokens, all heads" to "all tokens, my heads", attend over the full packed sequence, and all-to-all back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fipo_trainer.actor.varlen_sdpa import PaddedLayout, padded_causal_attention, padded_layout

ATTENTION_NAME = "fipo_ulysses"
_INNER_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class _State:
    """Per-process SP state: one actor rank per process, so module-level state is enough."""

    def __init__(self) -> None:
        self.group: Any = None
        self.size = 1
        self.rank = 0
        self.inner = ""
        self.position_ids: torch.Tensor | None = None
        self.bool_mask: torch.Tensor | None = None
        self.float_masks: dict[torch.dtype, torch.Tensor] = {}
        self.spans: list[tuple[int, int]] | None = None
        self.layouts: dict[torch.device, PaddedLayout | None] = {}


_STATE = _State()


def check_heads(num_attention_heads: int, num_key_value_heads: int, sp_size: int) -> None:
    """Fail early (at config time) instead of inside the first attention layer when heads cannot be split."""
    q_ok = num_attention_heads % sp_size == 0
    kv_ok = num_key_value_heads % sp_size == 0 or sp_size % num_key_value_heads == 0
    if q_ok and kv_ok:
        return
    valid = [
        k
        for k in range(1, num_attention_heads + 1)
        if num_attention_heads % k == 0
        and (num_key_value_heads % k == 0 or k % num_key_value_heads == 0)
    ]
    raise ValueError(
        f"actor.ulysses_sequence_parallel_size={sp_size} cannot split the model's heads "
        f"(num_attention_heads={num_attention_heads}, num_key_value_heads={num_key_value_heads}): "
        "num_attention_heads must be divisible by it, and num_key_value_heads must be divisible by it or divide it. "
        f"Values of actor.ulysses_sequence_parallel_size that work: {valid}"
    )


def set_group(group: Any, size: int, rank: int) -> None:
    """Select this rank's SP process group (None or size 1 turns sequence parallelism off)."""
    if size > 1 and group is None:
        raise ValueError("set_group: a process group is required when size > 1")
    if not 0 <= rank < max(size, 1):
        raise ValueError(f"set_group: rank {rank} outside group of size {size}")
    _STATE.group = group if size > 1 else None
    _STATE.size = max(size, 1)
    _STATE.rank = rank


def set_sequence(full_position_ids: torch.Tensor) -> None:
    """Remember the whole packed row's position ids; masks derive from it lazily (and survive checkpoint re-runs)."""
    if full_position_ids.dim() != 2 or full_position_ids.shape[0] != 1:
        raise ValueError(
            f"set_sequence expects [1, T] position ids, got {tuple(full_position_ids.shape)}"
        )
    if full_position_ids.shape[1] % _STATE.size != 0:
        raise ValueError(
            f"set_sequence: length {full_position_ids.shape[1]} not divisible by SP size {_STATE.size}; pad it first"
        )
    _STATE.position_ids = full_position_ids
    _STATE.bool_mask = None
    _STATE.float_masks = {}
    _STATE.spans = None
    _STATE.layouts = {}


def _sequence_spans() -> list[tuple[int, int]]:
    """[start, end) of each packed sequence (position ids restart at 0), cached."""
    if _STATE.spans is None:
        if _STATE.position_ids is None:
            raise RuntimeError("ulysses: set_sequence() must be called before the forward pass")
        pos = _STATE.position_ids[0]
        starts = torch.nonzero(pos == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        _STATE.spans = list(zip(starts, [*starts[1:], pos.numel()], strict=True))
    return _STATE.spans


def _full_bool_mask(device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] True where key is in the query's packed sequence and not in its future."""
    if _STATE.bool_mask is None or _STATE.bool_mask.device != device:
        if _STATE.position_ids is None:
            raise RuntimeError("ulysses: set_sequence() must be called before the forward pass")
        seq_id = torch.cumsum(_STATE.position_ids[0].to(device) == 0, dim=0)
        idx = torch.arange(seq_id.numel(), device=seq_id.device)
        mask = (seq_id[:, None] == seq_id[None, :]) & (idx[None, :] <= idx[:, None])
        _STATE.bool_mask = mask[None, None]
        _STATE.float_masks = {}
    return _STATE.bool_mask


def _full_mask(dtype: torch.dtype, device: torch.device, additive: bool) -> torch.Tensor:
    """sdpa takes the bool mask; eager adds its mask to the scores, so it needs 0 / -inf-like floats."""
    mask = _full_bool_mask(device)
    if not additive:
        return mask
    if dtype not in _STATE.float_masks:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        _STATE.float_masks[dtype] = torch.where(mask, zero, torch.finfo(dtype).min)
    return _STATE.float_masks[dtype]


def _all_to_all(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any, size: int
) -> torch.Tensor:
    """Split x into `size` chunks along scatter_dim, send chunk i to rank i, concatenate received along gather_dim."""
    chunks = x.chunk(size, dim=scatter_dim)
    send = torch.stack(
        chunks, dim=0
    ).contiguous()  # chunk i goes to rank i: all_to_all_single splits dim 0
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _SeqAllToAll(torch.autograd.Function):
    """All-to-all as a permutation of the global tensor: its gradient is the inverse all-to-all."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any, size: int
    ) -> torch.Tensor:
        ctx.dims, ctx.group, ctx.size = (scatter_dim, gather_dim), group, size
        return _all_to_all(x, scatter_dim, gather_dim, group, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scatter_dim, gather_dim = ctx.dims
        return (
            _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group, ctx.size),
            None,
            None,
            None,
            None,
        )


def _seq_to_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T/k, D] (my tokens, all heads) -> [B, H/k, T, D] (all tokens, my heads)."""
    return _SeqAllToAll.apply(x, 1, 2, _STATE.group, _STATE.size)


def _heads_to_seq(x: torch.Tensor) -> torch.Tensor:
    """[B, H/k, T, D] -> [B, H, T/k, D]: the inverse of _seq_to_heads."""
    return _SeqAllToAll.apply(x, 2, 1, _STATE.group, _STATE.size)


class _Proxy:
    """Stand-in for an object that overrides a few attributes and delegates the rest.

    The inner attention reads `module.num_key_value_groups` (sdpa/eager repeat kv with it) and
    `module.config._attn_implementation` (flash picks its kernel by it); both must describe the local heads and the
    inner implementation, not the model-wide values and our wrapper's name.
    """

    def __init__(self, target: Any, **overrides: Any) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_target"), name)


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each kv head n_rep times consecutively (like transformers' repeat_kv) so kv heads split over k ranks."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def _inner_function(name: str) -> Any:
    if name == "eager":
        # transformers has no global "eager" entry (each model ships its own); the Llama one is the generic
        # matmul-softmax-matmul shared by Qwen2 and most decoder models.
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    return AttentionInterface._global_mapping[name]


def _per_sequence_sdpa(
    inner: Any, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs
) -> torch.Tensor:
    """The CPU analogue of varlen flash attention: each packed sequence attends causally to
    itself (sdpa's is_causal, no mask), so no [T, T] mask exists and the work is sum(L_i^2),
    not T^2. Exactly the block-diagonal causal attention. Returns [B, T, H, D]. One padded
    sdpa call for all sequences where the padding costs less than the calls it saves
    (``actor.varlen_sdpa``), else one call per sequence."""
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            "ulysses: sliding-window attention is only supported with flash_attention_2"
        )
    if query.device not in _STATE.layouts:
        _STATE.layouts[query.device] = padded_layout(_sequence_spans(), query.device)
    layout = _STATE.layouts[query.device]
    if layout is not None:
        return padded_causal_attention(inner, module, query, key, value, layout, kwargs)
    pieces = [
        inner(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in _sequence_spans()
    ]
    return torch.cat(pieces, dim=1)


def _ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the whole packed row for a rank that holds only its sequence shard."""
    inner_name = _STATE.inner
    inner = _inner_function(inner_name)
    size = _STATE.size
    config_proxy = _Proxy(module.config, _attn_implementation=inner_name)
    if size == 1:
        proxy = _Proxy(module, config=config_proxy)
        if inner_name == "sdpa":
            return _per_sequence_sdpa(inner, proxy, query, key, value, kwargs), None
        return inner(proxy, query, key, value, attention_mask, **kwargs)

    num_heads, num_kv = query.shape[1], key.shape[1]
    check_heads(num_heads, num_kv, size)
    n_rep = 1 if num_kv % size == 0 else size // num_kv
    key, value = _repeat_heads(key, n_rep), _repeat_heads(value, n_rep)
    query, key, value = _seq_to_heads(query), _seq_to_heads(key), _seq_to_heads(value)
    proxy = _Proxy(module, config=config_proxy, num_key_value_groups=num_heads // (num_kv * n_rep))

    if inner_name.startswith("flash_attention"):
        # Untested here (no GPU): flash derives varlen cu_seqlens from packed position ids when no mask is given.
        # Local varlen kwargs would describe the shard, not the full row: drop them so position ids decide.
        for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(name, None)
        kwargs["position_ids"] = _STATE.position_ids.to(query.device)
        mask = None
    elif inner_name == "sdpa":
        out = _per_sequence_sdpa(inner, proxy, query, key, value, kwargs)  # [B, T, H/k, D]
        return _heads_to_seq(out.transpose(1, 2)).transpose(1, 2).contiguous(), None
    else:
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError(
                "ulysses: sliding-window attention is only supported with flash_attention_2"
            )
        mask = _full_mask(query.dtype, query.device, additive=inner_name == "eager")
    out, _ = inner(proxy, query, key, value, mask, **kwargs)  # [B, T, H/k, D]
    out = _heads_to_seq(out.transpose(1, 2))  # [B, H, T/k, D]
    return out.transpose(1, 2).contiguous(), None


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """With SP on, the model would build a mask for its local shard only, which is useless: return None (the wrapper
    uses the full one). sdpa runs per packed sequence and needs none. Otherwise defer to the inner implementation's
    mask so packed rows stay block-diagonal."""
    if _STATE.size > 1 or _STATE.inner == "sdpa":
        return None
    return AttentionMaskInterface._global_mapping[_STATE.inner](*args, **kwargs)


def install(inner_implementation: str) -> str:
    """Register the wrapper with transformers so models pick it up via `attn_implementation=ATTENTION_NAME`.

    Idempotent; a later call with another inner implementation switches all models of this process to it."""
    if inner_implementation not in _INNER_IMPLEMENTATIONS:
        raise ValueError(
            f"ulysses: inner attention must be one of {_INNER_IMPLEMENTATIONS}, got {inner_implementation!r}"
        )
    _STATE.inner = inner_implementation
    AttentionInterface.register(ATTENTION_NAME, _ulysses_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask)
    return ATTENTION_NAME
