"""Driver side of the weight sync: ``WeightSync(actor, rollout).sync()``.

The sync group joins actor rank 0 (rank 0, the sender) with every rollout worker (ranks
1..R) over a dedicated process group (``cluster.weight_transport``), and streams the
weights in buckets (``cluster.weight_bucket``). ``sync()`` forms the group on first use, then
every actor rank runs ``sync_weights`` (ZeRO-3 gathers are collectives; rank 0 sends) while
every rollout worker runs ``receive_weights`` and loads the stream into its engine.

The worker classes subclass :class:`WeightSender` / :class:`WeightReceiver` (abstract:
a worker missing a method fails when it starts, not in the middle of a sync).
"""

from __future__ import annotations

import abc
import functools
import time
from collections.abc import Callable
from typing import Any

from fipo_trainer.cluster.waiting import wait_labelled
from fipo_trainer.cluster.weight_bucket import (
    DEFAULT_BUCKET_BYTES,
    SyncStats,
    TensorMeta,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)
from fipo_trainer.cluster.weight_transport import WeightSyncReceiver, WeightSyncSender
from fipo_trainer.cluster.worker_group import WorkerGroup

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "SyncStats",
    "TensorMeta",
    "WeightReceiver",
    "WeightSender",
    "WeightSync",
    "WeightSyncReceiver",
    "WeightSyncSender",
    "pack_bucket",
    "plan_buckets",
    "unpack_bucket",
    "worker_group_of",
]


class WeightSender(abc.ABC):
    """The sending worker's side (every actor rank; rank 0 sends): the methods a sender
    class must implement, named once so ``WeightSync`` calls them by function."""

    @abc.abstractmethod
    def init_weight_sync(
        self,
        host: str | None,
        port: int,
        world_size: int,
        *,
        timeout_s: float = 300.0,
        group_name: str = "default",
        connect: bool = True,
    ) -> tuple[str, int] | None:
        """Rank 0: open the group's store (``port=0``: a free one); returns (host, port)."""

    @abc.abstractmethod
    def connect_weight_sync(self) -> None:
        """Rank 0: join the group (concurrently with the receivers)."""

    @abc.abstractmethod
    def sync_weights(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, float]:
        """Stream the current weights (rank 0: ``sync/*`` metrics of what it sent)."""


class WeightReceiver(abc.ABC):
    """The receiving worker's side (every rollout worker)."""

    @abc.abstractmethod
    def init_weight_sync(
        self,
        host: str,
        port: int,
        world_size: int,
        rank: int | None = None,
        *,
        timeout_s: float = 300.0,
        group_name: str = "default",
    ) -> int:
        """Join the group as ``rank`` (blocks until every rank joined)."""

    @abc.abstractmethod
    def receive_weights(self, version: int | None = None) -> dict[str, float]:
        """Receive one stream and load it; the engines then hold weights ``version`` (None:
        one more than before). ``sync/*`` metrics of what arrived."""


def worker_group_of(role: Any) -> WorkerGroup:
    """The ``WorkerGroup`` of a role object (``ActorGroup``, ``RolloutGroup``) or itself."""
    if isinstance(role, WorkerGroup):
        return role
    group = getattr(role, "worker_group", None)
    if not isinstance(group, WorkerGroup):
        raise TypeError(
            f"expected a WorkerGroup or a role with a .worker_group, got {type(role).__name__}"
        )
    return group


class WeightSync:
    """Actor -> rollout engines. ``sync()`` connects on first use, then pushes the weights."""

    def __init__(
        self,
        sender: Any,
        receivers: Any,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float | None = 600.0,
        connect_timeout_s: float = 300.0,
        group_name: str = "default",
    ) -> None:
        self._sender = worker_group_of(sender)
        self._receivers = worker_group_of(receivers)
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.group_name = group_name
        self.address: tuple[str, int] | None = None

    @property
    def connected(self) -> bool:
        return self.address is not None

    def connect(self) -> tuple[str, int]:
        """Form the sync group (idempotent); returns its store's (host, port)."""
        if self.address is not None:
            return self.address
        timeout = self.connect_timeout_s
        world = 1 + self._receivers.world_size
        opened = self._sender.submit(
            WeightSender.init_weight_sync,
            None,
            0,
            world,
            ranks=[0],
            timeout_s=timeout,
            group_name=self.group_name,
            connect=False,
        )
        host, port = wait_labelled(opened, what="init_weight_sync", timeout_s=timeout)[0]
        refs = self._sender.submit(WeightSender.connect_weight_sync, ranks=[0])
        for r in range(self._receivers.world_size):
            refs += self._receivers.submit(
                WeightReceiver.init_weight_sync,
                host,
                port,
                world,
                r + 1,
                ranks=[r],
                timeout_s=timeout,
                group_name=self.group_name,
            )
        wait_labelled(refs, what="joining the weight sync group", timeout_s=timeout + 30)
        self.address = (host, port)
        return self.address

    def sync(
        self, bucket_bytes: int | None = None, *, version: int | None = None
    ) -> dict[str, float]:
        """Push the actor's current weights to every rollout engine; ``sync/*`` metrics."""
        return self.start(bucket_bytes, version=version)()

    def start(
        self, bucket_bytes: int | None = None, *, version: int | None = None
    ) -> Callable[[], dict[str, float]]:
        """Submit the sync; returns the wait (``sync/*`` metrics, or the first failure).

        The engines then hold weights ``version`` (None: one more than before). A rollout
        worker runs the driver's calls in the order they were submitted, so a generation
        submitted after this one runs on the new weights without the driver waiting for the
        load in between (the async producer's next round; ``RLTrainer._engines_at``)."""
        self.connect()
        start = time.perf_counter()
        senders = self._sender.submit(WeightSender.sync_weights, bucket_bytes or self.bucket_bytes)
        receivers = self._receivers.submit(WeightReceiver.receive_weights, version)
        return functools.partial(self._finish, senders, receivers, start)

    def _finish(self, senders: list, receivers: list, start: float) -> dict[str, float]:
        results = wait_labelled(senders + receivers, what="weight sync", timeout_s=self.timeout_s)
        sent: dict[str, float] = results[0]
        received: list[dict[str, float]] = results[len(senders) :]
        for i, got in enumerate(received):
            if got.get("sync/bytes") != sent.get("sync/bytes"):
                raise RuntimeError(
                    f"weight sync: rollout worker {i} received {got.get('sync/bytes')} bytes, "
                    f"actor sent {sent.get('sync/bytes')}"
                )
        return {
            **sent,
            "sync/wall_seconds": time.perf_counter() - start,
            "sync/load_seconds_max": max((g["sync/seconds"] for g in received), default=0.0),
        }
