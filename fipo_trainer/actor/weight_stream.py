"""Full weights out of the training engine, a bucket at a time: for weight sync and export.

Why one module: the sync to the rollout engines and the Hugging Face export read the same
thing (every parameter and persistent buffer under its HF name, full — not a ZeRO-3
shard). Under ZeRO-3 reading a parameter is a collective, so every rank must run the same
stream; gathering a bounded bucket at a time keeps the extra memory to one bucket.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fipo_trainer.actor.engine import DeepSpeedEngine, full_numel
from fipo_trainer.cluster.weight_bucket import TensorMeta, aligned_nbytes
from fipo_trainer.platform import current_platform

DEFAULT_BUCKET_BYTES = 256 * 2**20


def stream_full_weights(
    engine: DeepSpeedEngine, rank: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs, yielded on rank 0 (on its device, training dtype).

    Call it on every rank and exhaust it there: under ZeRO-3 the gathers are collectives.
    ZeRO-2 tensors are the live parameters: read them, do not modify them.
    """
    named = engine.named_tensors()
    if not engine.zero3:
        if rank == 0:
            for name, t in named:
                yield name, t.detach()
        return
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for i, (name, t) in enumerate(named):
        bucket.append((name, t))
        size += full_numel(t) * t.element_size()
        if size < bucket_bytes and i < len(named) - 1:
            continue
        with engine.gathered([p for _, p in bucket]):
            ready = [(n, p.detach().clone()) for n, p in bucket] if rank == 0 else []
        yield from ready
        bucket, size = [], 0


def drain(stream: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Run a stream to its end (ranks > 0 take part in the gathers, keep nothing)."""
    for _ in stream:
        pass


def full_state_dict(
    engine: DeepSpeedEngine, rank: int, all_ranks: bool = False
) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict (HF names) on rank 0, or on every rank (cross-rank checks)."""
    if not all_ranks:
        sd = {n: t.detach().to("cpu", copy=True) for n, t in stream_full_weights(engine, rank)}
        return sd if rank == 0 else None
    out = {}
    for name, t in engine.named_tensors():
        with engine.gathered([t]):
            out[name] = t.detach().cpu().clone()
    return out


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """Shape of a tensor, also of a ZeRO-3 partitioned parameter."""
    return tuple(getattr(t, "ds_shape", t.shape))


def packed_full_weights(
    engine: DeepSpeedEngine,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    *,
    keep: bool = True,
) -> Iterator[tuple[list[TensorMeta], torch.Tensor]]:
    """Full weights packed into shareable flat buckets on this rank's device, every rank.

    For the colocated sync: each actor rank feeds the engine rank on its own device. A
    bucket is filled one tensor at a time (under ZeRO-3 one gather per tensor), so the extra
    memory is one bucket plus the largest tensor. ``keep=False`` (a rank with no colocated
    engine) only takes part in the gathers. Exhaust it on every rank.
    """
    plat = current_platform()
    named = engine.named_tensors()
    start = 0
    while start < len(named):
        # The bucket: tensors in order up to bucket_bytes (a larger tensor alone).
        end, size = start, 0
        while end < len(named):
            t = named[end][1]
            nbytes = aligned_nbytes(full_numel(t) * t.element_size())
            if end > start and size + nbytes > bucket_bytes:
                break
            size += nbytes
            end += 1
        metas: list[TensorMeta] = []
        flat = plat.shareable_buffer(size, engine.device) if keep else None
        offset = 0
        for name, t in named[start:end]:
            nbytes = full_numel(t) * t.element_size()
            metas.append(TensorMeta(name, str(t.dtype), full_shape(t), offset, nbytes))
            with engine.gathered([t]):
                if flat is not None:
                    src = t.detach().contiguous().reshape(-1).view(torch.uint8)
                    flat[offset : offset + nbytes].copy_(src)
            offset += aligned_nbytes(nbytes)
        start = end
        if flat is not None:
            yield metas, flat
        del flat
