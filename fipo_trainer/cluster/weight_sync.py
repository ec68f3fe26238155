"""Actor rank 0 -> every rollout engine: bucketed broadcast over a dedicated process group.

Why a dedicated group: DeepSpeed owns the default torch.distributed group of the actor
processes, and the rollout processes are not part of it. A stateless group built from its
own TCPStore (gloo on CPU, NCCL on CUDA — the platform decides) joins actor rank 0 (rank 0
here) with the rollout workers (ranks 1..W-1) without touching anybody's default group.

Why buckets: sending one tensor at a time pays a collective's latency per tensor; sending
the whole model at once needs a second copy of it in memory (PEERS pain points 2 and 4).
Tensors are packed, in stream order, as raw bytes into flat buffers of at most
``bucket_bytes`` (a larger tensor travels alone). Each bucket is announced by a small
header broadcast (its byte lengths, then the names/dtypes/shapes/offsets as JSON), then the
data; a zero length ends the stream. Receivers yield views into each bucket buffer, so the
engine can load weights while later buckets are still in flight.

Use: all ranks construct their end concurrently (the constructors rendezvous), then for each
sync the sender calls ``send(named_tensors)`` while every receiver iterates ``receive()``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fipo_trainer.cluster.worker import node_ip
from fipo_trainer.platform import current_platform

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20
_ALIGN = 16  # byte offsets inside a bucket, so every dtype can be viewed in place
_STORE_PREFIX = "fipo_weight_sync"

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


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


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


def _encode(metas: list[TensorMeta]) -> bytes:
    return json.dumps(
        [[m.name, m.dtype, list(m.shape), m.offset, m.nbytes] for m in metas]
    ).encode()


def _decode(raw: bytes) -> list[TensorMeta]:
    return [TensorMeta(n, d, tuple(s), o, b) for n, d, s, o, b in json.loads(raw.decode())]


class _Endpoint:
    """One rank of the dedicated group (shared by sender and receiver)."""

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int,
        rank: int,
        *,
        backend: str | None,
        timeout_s: float,
        group_name: str,
        store: dist.Store | None = None,
    ):
        if world_size < 2:
            raise ValueError(
                f"weight sync needs the sender and >= 1 receiver, got world_size={world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"weight sync rank {rank} is outside world_size {world_size}")
        plat = current_platform()
        self.backend = backend or plat.dist_backend
        self.device = plat.device(0) if self.backend == "nccl" else torch.device("cpu")
        self.rank, self.world_size = rank, world_size
        self.host, self.timeout_s = host, timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        self.port = store.port
        self._store = store
        prefixed = dist.PrefixStore(f"{_STORE_PREFIX}/{group_name}", store)
        start = time.perf_counter()
        try:
            self._pg = self._make_group(prefixed, timeout)
            # The constructor only dials; a barrier-like broadcast proves every rank is up.
            self._broadcast(torch.zeros(1, dtype=torch.int64, device=self.device))
        except Exception as exc:
            raise RuntimeError(
                f"weight sync group {group_name!r} ({self.backend}, {host}:{self.port}, rank "
                f"{rank}/{world_size}) did not form within {timeout_s:.0f}s: {exc}. Every rank "
                "(actor rank 0 and each rollout worker) must join concurrently; check that the "
                "host/port is reachable from all nodes"
            ) from exc
        logger.info(
            "weight sync rank %d/%d joined %s:%d (%s) in %.2fs",
            rank,
            world_size,
            host,
            self.port,
            self.backend,
            time.perf_counter() - start,
        )

    def _make_group(self, store: dist.Store, timeout: datetime.timedelta):
        if self.backend == "gloo":
            return dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)
        if self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            return dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)
        raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {self.backend!r}")

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        self._pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        pg = getattr(self, "_pg", None)
        if pg is not None and hasattr(pg, "shutdown"):
            with contextlib.suppress(RuntimeError):  # already torn down by a failed peer
                pg.shutdown()
        self._pg = None


class WeightSyncSender(_Endpoint):
    """Rank 0 (actor rank 0). ``port=0`` picks a free port: read it back from ``.port``.

    With ``connect=False`` only the store is opened (so the caller can publish host/port);
    call ``connect()`` concurrently with the receivers afterwards.
    """

    def __init__(
        self,
        world_size: int,
        host: str | None = None,
        port: int = 0,
        *,
        backend: str | None = None,
        timeout_s: float = 300.0,
        group_name: str = "default",
        connect: bool = True,
    ):
        self.host = host or node_ip()
        self.world_size = world_size
        self._args = (backend, timeout_s, group_name)
        self._store = dist.TCPStore(
            "0.0.0.0" if host is None else self.host,
            port,
            world_size,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        self.port = self._store.port
        self._connected = False
        if connect:
            self.connect()

    def connect(self) -> None:
        if self._connected:
            return
        backend, timeout_s, group_name = self._args
        super().__init__(
            self.host,
            self.port,
            self.world_size,
            0,
            backend=backend,
            timeout_s=timeout_s,
            group_name=group_name,
            store=self._store,
        )
        self._connected = True

    def send(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> SyncStats:
        """Broadcast the stream in buckets; returns what was sent (and how long it took)."""
        if not self._connected:
            raise RuntimeError("WeightSyncSender.send() before connect(); join the group first")
        stats = SyncStats()
        start = time.perf_counter()
        for bucket in plan_buckets(named_tensors, bucket_bytes):
            metas, flat = pack_bucket(bucket, self.device)
            header = torch.frombuffer(bytearray(_encode(metas)), dtype=torch.uint8).to(self.device)
            self._broadcast(
                torch.tensor([header.numel(), flat.numel()], dtype=torch.int64, device=self.device)
            )
            self._broadcast(header)
            self._broadcast(flat)
            stats.buckets += 1
            stats.tensors += len(metas)
            stats.bytes += sum(m.nbytes for m in metas)
            del flat
        self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device))  # end of stream
        stats.seconds = time.perf_counter() - start
        return stats


class WeightSyncReceiver(_Endpoint):
    """Ranks 1..W-1 (rollout workers). Construct concurrently with the sender's ``connect``."""

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int,
        rank: int,
        *,
        backend: str | None = None,
        timeout_s: float = 300.0,
        group_name: str = "default",
    ):
        if rank == 0:
            raise ValueError(
                "rank 0 is the sender (actor rank 0); rollout workers take ranks 1..W-1"
            )
        super().__init__(
            host,
            port,
            world_size,
            rank,
            backend=backend,
            timeout_s=timeout_s,
            group_name=group_name,
        )
        self.last_stats = SyncStats()

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) as buckets arrive; ``last_stats`` is final once exhausted."""
        stats = SyncStats()
        start = time.perf_counter()
        while True:
            sizes = torch.zeros(2, dtype=torch.int64, device=self.device)
            self._broadcast(sizes)
            header_len, data_len = (int(x) for x in sizes.tolist())
            if header_len == 0:
                break
            header = torch.empty(header_len, dtype=torch.uint8, device=self.device)
            self._broadcast(header)
            metas = _decode(header.cpu().numpy().tobytes())
            flat = torch.empty(data_len, dtype=torch.uint8, device=self.device)
            self._broadcast(flat)
            stats.buckets += 1
            stats.tensors += len(metas)
            stats.bytes += sum(m.nbytes for m in metas)
            yield from unpack_bucket(metas, flat)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats


# --------------------------------------------------------------------------- driver side
def _handles(group) -> list:
    """Ray actor handles of a ``WorkerGroup`` or of a role object holding one (``.workers``)."""
    inner = getattr(group, "workers", group)
    actors = getattr(inner, "actors", None)
    if actors is None:
        raise TypeError(
            f"expected a WorkerGroup (or an object with .workers), got {type(group).__name__}"
        )
    return list(actors)


def _wait_all(labelled_refs: list[tuple[str, object]], timeout_s: float | None) -> list:
    """Wait for refs of several roles at once; the first failure is raised naming its role/rank
    (the others may be blocked in a collective with it and would never return)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    label = {ref: name for name, ref in labelled_refs}
    order = [ref for _, ref in labelled_refs]
    results: dict = {}
    pending = list(order)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            raise GetTimeoutError(
                f"weight sync: {[label[r] for r in pending]} did not finish within {timeout_s:.0f}s"
            )
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except RayError as err:
                raise RuntimeError(f"weight sync: {label[ref]} failed: {err}") from err
    return [results[r] for r in order]


def connect_weight_sync(
    actor_group, rollout_group, *, timeout_s: float = 300.0, group_name: str = "default"
) -> tuple[str, int]:
    """Form the sync group: actor rank 0 (rank 0) + every rollout worker (ranks 1..R).

    Actor rank 0 needs ``init_weight_sync(host, port, world_size, timeout_s=, group_name=,
    connect=False)`` returning its (host, port) (``port=0``: a free one) and
    ``connect_weight_sync()``; rollout workers need
    ``init_weight_sync(host, port, world_size, rank, timeout_s=, group_name=)``.
    """
    actors, rollouts = _handles(actor_group), _handles(rollout_group)
    world = 1 + len(rollouts)
    opened = actors[0].init_weight_sync.remote(
        None, 0, world, timeout_s=timeout_s, group_name=group_name, connect=False
    )
    host, port = _wait_all([("actor rank 0", opened)], timeout_s)[0]
    refs = [("actor rank 0", actors[0].connect_weight_sync.remote())]
    refs += [
        (
            f"rollout worker {i}",
            r.init_weight_sync.remote(
                host, port, world, i + 1, timeout_s=timeout_s, group_name=group_name
            ),
        )
        for i, r in enumerate(rollouts)
    ]
    _wait_all(refs, timeout_s + 30)
    return host, port


def sync_weights(
    actor_group,
    rollout_group,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout_s: float | None = 600.0,
) -> dict[str, float]:
    """Push the actor's current weights to every rollout engine; returns ``sync/*`` metrics.

    Every actor rank runs ``sync_weights`` (ZeRO-3 gathers are collectives), rank 0 sends;
    every rollout worker runs ``receive_weights`` and loads the stream into its engine.
    """
    actors, rollouts = _handles(actor_group), _handles(rollout_group)
    start = time.perf_counter()
    refs = [(f"actor rank {i}", a.sync_weights.remote(bucket_bytes)) for i, a in enumerate(actors)]
    refs += [(f"rollout worker {i}", r.receive_weights.remote()) for i, r in enumerate(rollouts)]
    results = _wait_all(refs, timeout_s)
    sent: dict[str, float] = results[0]
    received: list[dict[str, float]] = results[len(actors) :]
    for i, got in enumerate(received):
        if got.get("sync/bytes") != sent.get("sync/bytes"):
            raise RuntimeError(
                f"weight sync: rollout worker {i} received {got.get('sync/bytes')} bytes, actor sent "
                f"{sent.get('sync/bytes')}"
            )
    return {
        **sent,
        "sync/wall_seconds": time.perf_counter() - start,
        "sync/load_seconds_max": max((g["sync/seconds"] for g in received), default=0.0),
    }
