"""Packing a stream of named tensors into flat byte buckets, and unpacking them as views.

Why buckets: sending one tensor at a time pays a collective's latency per tensor; sending
the whole model at once needs a second copy of it in memory. Tensors are packed, in stream
order, as raw bytes into flat buffers of at most ``bucket_bytes`` (a larger tensor travels
alone); a JSON header lists names/dtypes/shapes/offsets. Pure torch: no process group here
(the transport is ``cluster.weight_transport``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 256 << 20
_ALIGN = 16  # byte offsets inside a bucket, so every dtype can be viewed in place

_DTYPES: dict[str, torch.dtype] = {
    str(d): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # byte offset in the bucket
    nbytes: int


@dataclass
class SyncStats:
    """What one sync moved; ``metrics()`` gives the ``sync/*`` entries for the tracker."""

    seconds: float = 0.0
    bytes: int = 0
    buckets: int = 0
    tensors: int = 0

    def metrics(self, prefix: str = "sync/") -> dict[str, float]:
        return {
            f"{prefix}seconds": self.seconds,
            f"{prefix}bytes": float(self.bytes),
            f"{prefix}buckets": float(self.buckets),
            f"{prefix}tensors": float(self.tensors),
        }


def aligned_nbytes(n: int) -> int:
    """``n`` rounded up to the bucket alignment (every dtype can be viewed in place)."""
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


_aligned = aligned_nbytes


def plan_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a tensor stream, in order, into buckets of at most ``bucket_bytes`` (aligned).

    A tensor larger than ``bucket_bytes`` forms a bucket on its own. Lazy: only the
    current bucket's tensors are held.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor"
            )
        if str(tensor.dtype) not in _DTYPES:
            raise ValueError(
                f"weight {name!r} has dtype {tensor.dtype}, which weight sync cannot send"
            )
        nbytes = _aligned(tensor.numel() * tensor.element_size())
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def pack_bucket(
    bucket: list[tuple[str, torch.Tensor]], device: torch.device
) -> tuple[list[TensorMeta], torch.Tensor]:
    """Flatten tensors (any dtypes) into one uint8 buffer on ``device`` plus their metadata."""
    metas: list[TensorMeta] = []
    offset = 0
    for name, tensor in bucket:
        nbytes = tensor.numel() * tensor.element_size()
        metas.append(TensorMeta(name, str(tensor.dtype), tuple(tensor.shape), offset, nbytes))
        offset += _aligned(nbytes)
    flat = torch.zeros(offset, dtype=torch.uint8, device=device)
    for meta, (_, tensor) in zip(metas, bucket):
        src = tensor.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
        flat[meta.offset : meta.offset + meta.nbytes].copy_(src)
    return metas, flat


def unpack_bucket(
    metas: list[TensorMeta], flat: torch.Tensor
) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of ``flat`` with each tensor's dtype and shape (no copy)."""
    for m in metas:
        chunk = flat[m.offset : m.offset + m.nbytes]
        yield m.name, chunk.view(_DTYPES[m.dtype]).view(m.shape)


def encode_header(metas: list[TensorMeta]) -> bytes:
    return json.dumps(
        [[m.name, m.dtype, list(m.shape), m.offset, m.nbytes] for m in metas]
    ).encode()


def decode_header(raw: bytes) -> list[TensorMeta]:
    return [TensorMeta(n, d, tuple(s), o, b) for n, d, s, o, b in json.loads(raw.decode())]
