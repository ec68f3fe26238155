"""Actor rank 0 -> every rollout engine: bucketed broadcast over a dedicated process group.

Why a dedicated group: DeepSpeed owns the default torch.distributed group of the actor
processes, and the rollout processes are not part of it. A stateless group built from its
own TCPStore (gloo on CPU, NCCL on CUDA — the platform decides) joins actor rank 0 (rank 0
here) with the rollout workers (ranks 1..W-1) without touching anybody's default group.

Each bucket (``cluster.weight_bucket``) is announced by a small header broadcast (its byte
lengths, then the names/dtypes/shapes/offsets as JSON), then the data; a zero length ends
the stream. Receivers yield views into each bucket buffer, so the engine can load weights
while later buckets are still in flight.

Where it listens: the store's server and the sender's gloo pairs bind to the sender's host
only — this node's IP from :func:`cluster.worker.bind_host` (127.0.0.1 in a local run) —
never every interface; each receiver's gloo pairs bind to its own node's address.

Use: all ranks construct their end concurrently (the constructors rendezvous), then for each
sync the sender calls ``send(named_tensors)`` while every receiver iterates ``receive()``.
The sender enters the group's collectives only once every receiver has said (through the
store) that its ``receive()`` began: a receive may queue on a rollout worker behind a
generation that runs for minutes (``one_step`` submits the sync as soon as the producer's
batch is settled, ``trainer/settling.py``), longer than a collective may wait.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from fipo_trainer.cluster.weight_bucket import (
    DEFAULT_BUCKET_BYTES,
    SyncStats,
    decode_header,
    encode_header,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)
from fipo_trainer.cluster.worker import bind_host, is_loopback, node_ip, tcp_store
from fipo_trainer.platform import current_platform

logger = logging.getLogger(__name__)

_STORE_PREFIX = "fipo_weight_sync"
#: How long the sender waits for the receivers to begin a sync. Long: they may be finishing
#: a generation round, which its own deadline bounds (and the driver's wait names the sync).
READY_WAIT = datetime.timedelta(hours=24)


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
            store = tcp_store(host, port, world_size, is_master=False, timeout=timeout)
        self.port = store.port
        self._store = store
        self._ready = dist.PrefixStore(f"{_STORE_PREFIX}/{group_name}/ready", store)
        self._syncs = 0  # every sync has all ranks, so the ranks count them alike
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

    def _local_address(self) -> str:
        # The sender listens where its store does; a receiver on its own node's address
        # (loopback when the sender is on loopback: then every rank is on this machine).
        if self.rank == 0 or is_loopback(self.host):
            return self.host
        return bind_host(node_ip())

    def _make_group(self, store: dist.Store, timeout: datetime.timedelta):
        if self.backend == "gloo":
            # The default gloo device listens on the hostname's address, whatever that is.
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self._local_address())]
            return dist.ProcessGroupGloo(store, self.rank, self.world_size, opts)
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

    ``host=None``: this node's IP (127.0.0.1 in a local run); the store listens there only.

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
        self.host = bind_host(host)
        self.world_size = world_size
        self._args = (backend, timeout_s, group_name)
        self._store = tcp_store(
            self.host,
            port,
            world_size,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout_s),
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
        self._syncs += 1
        ready = [f"{self._syncs}/{rank}" for rank in range(1, self.world_size)]
        self._ready.wait(ready, READY_WAIT)
        for key in ready:
            self._ready.delete_key(key)
        stats = SyncStats()
        start = time.perf_counter()
        for bucket in plan_buckets(named_tensors, bucket_bytes):
            metas, flat = pack_bucket(bucket, self.device)
            header = torch.frombuffer(bytearray(encode_header(metas)), dtype=torch.uint8).to(self.device)
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
        self._syncs += 1
        self._ready.set(f"{self._syncs}/{self.rank}", "1")
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
            metas = decode_header(header.cpu().numpy().tobytes())
            flat = torch.empty(data_len, dtype=torch.uint8, device=self.device)
            self._broadcast(flat)
            stats.buckets += 1
            stats.tensors += len(metas)
            stats.bytes += sum(m.nbytes for m in metas)
            yield from unpack_bucket(metas, flat)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
