"""Driver side of the colocated weight sync: ``SharedWeightSync(actor, rollout).sync()``.

Colocated placement puts actor rank i and rollout worker i (one vLLM TP rank) on bundle i,
the same device. Instead of a broadcast between two processes on one GPU (which NCCL
refuses), each pair hands shareable buffers across (``cluster.shared_weights``): actor
rank i packs the full weights a bucket at a time and rollout worker i loads its TP slice
from the same memory. Actor ranks without a rollout worker (fewer engine ranks than
devices) only take part in the ZeRO-3 gathers.

Same interface as ``cluster.weight_sync.WeightSync``: ``connect()`` once, ``sync()`` per step.
"""

from __future__ import annotations

import abc
import functools
import time
from collections.abc import Callable
from typing import Any

from fipo_trainer.cluster.waiting import wait_labelled
from fipo_trainer.cluster.weight_bucket import DEFAULT_BUCKET_BYTES
from fipo_trainer.cluster.weight_sync import worker_group_of


class SharedWeightsSource(abc.ABC):
    """The actor worker's side (every rank; the gathers are collectives)."""

    @abc.abstractmethod
    def connect_shared_weights(
        self, address: tuple[str, bytes] | None, timeout_s: float = 300.0
    ) -> None:
        """Connect to the colocated rollout worker at ``address`` (None: this rank has none)."""

    @abc.abstractmethod
    def send_shared_weights(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, float]:
        """Stream the full weights to the colocated engine rank; ``sync/*`` metrics."""


class SharedWeightsSink(abc.ABC):
    """The rollout worker's side (one vLLM TP rank)."""

    @abc.abstractmethod
    def listen_shared_weights(self, timeout_s: float = 300.0) -> tuple[str, bytes]:
        """Open this worker's socket; returns (path, authkey) for its actor rank."""

    @abc.abstractmethod
    def accept_shared_weights(self) -> None:
        """Wait for the colocated actor rank to connect."""

    @abc.abstractmethod
    def receive_shared_weights(self, version: int | None = None) -> dict[str, float]:
        """Wake the engine, load one stream (weights ``version``; None: one more than
        before); ``sync/*`` metrics of what arrived."""


class SharedWeightSync:
    """Actor rank i -> rollout worker i, same device; ``sync()`` connects on first use."""

    def __init__(
        self,
        sender: Any,
        receivers: Any,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float | None = 600.0,
        connect_timeout_s: float = 300.0,
    ) -> None:
        self._sender = worker_group_of(sender)
        self._receivers = worker_group_of(receivers)
        if self._receivers.world_size > self._sender.world_size:
            raise ValueError(
                f"colocated weight sync: {self._receivers.world_size} engine ranks but only "
                f"{self._sender.world_size} actor ranks (one engine rank per actor device)"
            )
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.connected = False

    def connect(self) -> None:
        """Pair every rollout worker with the actor rank on its device (idempotent)."""
        if self.connected:
            return
        timeout = self.connect_timeout_s
        addresses = wait_labelled(
            self._receivers.submit(SharedWeightsSink.listen_shared_weights, timeout),
            what="listen_shared_weights",
            timeout_s=timeout,
        )
        refs = self._receivers.submit(SharedWeightsSink.accept_shared_weights)
        for rank in range(self._sender.world_size):
            address = addresses[rank] if rank < len(addresses) else None
            refs += self._sender.submit(
                SharedWeightsSource.connect_shared_weights, address, timeout, ranks=[rank]
            )
        wait_labelled(refs, what="pairing actor ranks with engine ranks", timeout_s=timeout + 30)
        self.connected = True

    def sync(
        self, bucket_bytes: int | None = None, *, version: int | None = None
    ) -> dict[str, float]:
        """Every engine rank loads the actor's current weights; ``sync/*`` metrics (the
        largest ``sync/peak_extra_bytes`` of any actor rank)."""
        return self.start(bucket_bytes, version=version)()

    def start(
        self, bucket_bytes: int | None = None, *, version: int | None = None
    ) -> Callable[[], dict[str, float]]:
        """Submit the sync; returns its wait (as ``WeightSync.start``)."""
        self.connect()
        start = time.perf_counter()
        senders = self._sender.submit(
            SharedWeightsSource.send_shared_weights, bucket_bytes or self.bucket_bytes
        )
        receivers = self._receivers.submit(SharedWeightsSink.receive_shared_weights, version)
        return functools.partial(self._finish, senders, receivers, start)

    def _finish(self, senders: list, receivers: list, start: float) -> dict[str, float]:
        results = wait_labelled(senders + receivers, what="weight sync", timeout_s=self.timeout_s)
        sent: list[dict[str, float]] = [r for r in results[: len(senders)] if r]
        received: list[dict[str, float]] = results[len(senders) :]
        for i, got in enumerate(received):
            if got.get("sync/bytes") != sent[0].get("sync/bytes"):
                raise RuntimeError(
                    f"weight sync: engine rank {i} loaded {got.get('sync/bytes')} bytes, the "
                    f"actor sent {sent[0].get('sync/bytes')}"
                )
        return {
            **sent[0],
            "sync/peak_extra_bytes": max(s["sync/peak_extra_bytes"] for s in sent),
            "sync/wall_seconds": time.perf_counter() - start,
            "sync/load_seconds_max": max((g["sync/seconds"] for g in received), default=0.0),
        }
