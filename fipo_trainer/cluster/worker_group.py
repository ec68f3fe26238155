"""A group of N Ray actors of one worker class: placement, rank env, health check, dispatch.

Why a health check: a worker that raises in ``__init__`` (bad model path, OOM) otherwise
shows up as a hang in the other ranks' collective init. Start-up waits for every rank's
``health()`` with a deadline and names the rank that failed, with its error, or the ranks
that never answered and what the cluster had free.

Why calls take the worker class's functions (``group.call_all(MyWorker.save, path)``)
rather than method-name strings: a renamed or misspelt method fails where it is written,
tools can follow the reference, and the Ray handles never leave this package (the name is
resolved here, and checked against the worker class).

Why every call has a deadline: a rank that stops answering without dying would otherwise
hang the driver forever. Calls wait for the group's ``deadline`` (``set_deadline``; the
trainer's ``trainer.call_timeout_s``) unless given their own (``deadline=``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from fipo_trainer.cluster.dispatch import restore_order
from fipo_trainer.cluster.reap import LocalProcess, reap
from fipo_trainer.cluster.resource_pool import ResourcePool, RolePlacement, cluster_has_gpus
from fipo_trainer.cluster.stacks import add_stacks
from fipo_trainer.cluster.waiting import (
    CallTimeoutError,
    Deadline,
    RankLabel,
    WorkerCallError,
    WorkerStartupError,
    wait_labelled,
)
from fipo_trainer.cluster.worker import DistInfo, Worker, free_port, node_ip
from fipo_trainer.data.batch import Batch
from fipo_trainer.platform import forwarded_env, worker_env

__all__ = ["CallTimeoutError", "Deadline", "WorkerCallError", "WorkerGroup", "WorkerStartupError"]

logger = logging.getLogger(__name__)


def _probe_master() -> tuple[str, int]:
    return node_ip(), free_port()


def _single_node() -> bool:
    """Whether the cluster is this one machine (then rank 0's node is the driver's)."""
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive")) == 1
    except Exception:  # pragma: no cover - a client connection without node info
        return False


class WorkerGroup:
    """N Ray actors of ``worker_cls`` (a ``Worker`` subclass), rank ``i`` on bundle ``i``.

    ``pool`` may be a ``ResourcePool`` (one worker per bundle), a ``RolePlacement`` (which
    bundles and how much of each), or None (a private pool is created and removed with the
    group). Every actor starts with ``worker_env()`` plus RANK/WORLD_SIZE/MASTER_ADDR/
    MASTER_PORT/LOCAL_RANK; MASTER_ADDR/PORT are a free port on rank 0's node.
    ``wait=False`` returns once the actors are created; :meth:`wait_ready` waits for them.
    """

    def __init__(
        self,
        worker_cls: type[Worker],
        world_size: int,
        *,
        init_kwargs: dict[str, Any] | None = None,
        pool: ResourcePool | RolePlacement | None = None,
        name: str = "workers",
        num_cpus_per_worker: float | None = None,
        num_gpus_per_worker: float | None = None,
        startup_timeout_s: float = 600.0,
        env: dict[str, str] | None = None,
        deadline: Deadline | None = None,
        wait: bool = True,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"worker group {name!r}: world_size must be >= 1, got {world_size}")
        if not (isinstance(worker_cls, type) and issubclass(worker_cls, Worker)):
            raise TypeError(f"worker group {name!r}: {worker_cls!r} must subclass cluster.Worker")
        self.name = name
        self.world_size = world_size
        self.worker_cls = worker_cls
        self._owned_pool: ResourcePool | None = None
        self.deadline = deadline or Deadline()
        placement = self._resolve_placement(pool, num_cpus_per_worker, num_gpus_per_worker)
        self.placement = placement
        self._actors: list[Any] = []
        self._local: dict[int, LocalProcess] = {}  # worker processes on this machine, by rank
        self._startup_timeout_s = startup_timeout_s
        self._ready = False
        try:
            self._start(placement, init_kwargs or {}, env or {}, startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every rank finished ``__init__`` (idempotent; shuts the group down if
        one fails). Why separate: a group built with ``wait=False`` starts its workers and
        returns, so several roles' workers start concurrently and the caller waits once."""
        if self._ready:
            return
        try:
            self._health_check(self._startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self._ready = True

    # ----------------------------------------------------------------- start-up
    def _resolve_placement(self, pool: ResourcePool | RolePlacement | None,
                           num_cpus: float | None, num_gpus: float | None) -> RolePlacement:  # fmt: skip
        if pool is None:
            gpus = num_gpus if num_gpus is not None else (1.0 if cluster_has_gpus() else 0.0)
            self._owned_pool = ResourcePool.create(
                self.world_size,
                cpus_per_bundle=num_cpus,
                gpus_per_bundle=gpus,
                name=self.name,
            )
            pool = self._owned_pool
        placement = RolePlacement.whole_pool(pool) if isinstance(pool, ResourcePool) else pool
        if placement.world_size < self.world_size:
            raise ValueError(
                f"worker group {self.name!r}: world_size {self.world_size} but its placement "
                f"has only {placement.world_size} bundles"
            )
        return RolePlacement(
            pool=placement.pool,
            bundle_indices=placement.bundle_indices[: self.world_size],
            num_cpus_per_worker=(
                num_cpus if num_cpus is not None else placement.num_cpus_per_worker
            ),
            num_gpus_per_worker=(
                num_gpus if num_gpus is not None else placement.num_gpus_per_worker
            ),
        )

    def _start(
        self,
        placement: RolePlacement,
        init_kwargs: dict[str, Any],
        extra_env: dict[str, str],
        timeout_s: float,
    ) -> None:
        pool = placement.pool
        if _single_node():
            # Why not the probe task here too: it costs a worker process that imports this
            # package (torch included: ~3 s of CPU, ~0.3 GiB held while idle) for an answer
            # the driver has.
            master_addr, master_port = _probe_master()
        else:
            probe = (
                ray.remote(num_cpus=0)(_probe_master)
                .options(scheduling_strategy=pool.scheduling(placement.bundle_indices[0]))
                .remote()
            )
            master_addr, master_port = wait_labelled(
                [(f"{self._label(0)}'s node probe", probe)],
                what="start-up",
                timeout_s=max(timeout_s, 1.0),
                error=WorkerStartupError,
            )[0]
        base_env = {**worker_env(), **forwarded_env()}
        remote_cls = ray.remote(self.worker_cls)
        for rank, bundle in enumerate(placement.bundle_indices):
            info = DistInfo(
                rank=rank,
                world_size=self.world_size,
                master_addr=master_addr,
                master_port=master_port,
                # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so device 0.
                local_rank=0,
                group_name=self.name,
            )
            actor = remote_cls.options(
                num_cpus=placement.num_cpus_per_worker,
                num_gpus=placement.num_gpus_per_worker,
                scheduling_strategy=pool.scheduling(bundle),
                runtime_env={"env_vars": {**base_env, **extra_env, **info.env()}},
                max_restarts=0,
            ).remote(**init_kwargs)
            self._actors.append(actor)

    def _health_check(self, timeout_s: float) -> None:
        start = time.monotonic()
        cls = self.worker_cls.__name__
        labels = [f"{self._label(rank)} ({cls})" for rank in range(self.world_size)]

        def timed_out(pending: list[str]) -> str:
            ranks = sorted(labels.index(p) for p in pending)
            return (
                f"worker group {self.name!r} ({cls}): rank(s) {ranks} did not finish __init__ "
                f"within {timeout_s:.0f}s. Ray available resources: {_avail()}. If they wait "
                "for resources, lower num_cpus/num_gpus per worker; if start-up is just slow "
                "(first DeepSpeed init compiles a comm op, ~45 s on CPU), raise "
                "startup_timeout_s."
            )

        refs = [(label, a.health.remote()) for label, a in zip(labels, self._actors)]
        self.worker_info: list[dict[str, Any]] = wait_labelled(
            refs,
            what="start-up",
            timeout_s=timeout_s,
            error=WorkerStartupError,
            on_timeout=timed_out,
        )
        found = (LocalProcess.of(info, self.worker_cls) for info in self.worker_info)
        self._local = {r: p for r, p in enumerate(found) if p is not None}
        logger.info(
            "worker group %s: %d x %s ready in %.1fs",
            self.name,
            self.world_size,
            cls,
            time.monotonic() - start,
        )

    # ----------------------------------------------------------------- calls
    def _label(self, rank: int) -> RankLabel:
        return RankLabel(self.name, rank)

    def set_deadline(self, deadline: Deadline) -> None:
        """The deadline of every call that is not given its own (``deadline=``)."""
        self.deadline = deadline

    def _method(self, fn: Callable[..., Any]) -> str:
        """The method name of ``fn``, a function of the worker class (``MyWorker.step``)."""
        if isinstance(fn, str):
            raise TypeError(
                f"worker group {self.name!r}: pass the worker class's function "
                f"(e.g. {self.worker_cls.__name__}.{fn}), not the string {fn!r}"
            )
        name = getattr(fn, "__name__", None)
        if name is None or not callable(getattr(self.worker_cls, name, None)):
            raise AttributeError(
                f"worker group {self.name!r}: {self.worker_cls.__name__} has no method "
                f"{name or fn!r}"
            )
        return name

    def submit(
        self, fn: Callable[..., Any], *args: Any, ranks: Sequence[int] | None = None, **kwargs: Any
    ) -> list[tuple[str, ray.ObjectRef]]:
        """Start ``fn(*args, **kwargs)`` on ``ranks`` (default: all) without waiting.

        Returns ``(label, ref)`` pairs for :func:`cluster.waiting.wait_labelled` (used where
        calls on several groups must be awaited together, e.g. the weight sync)."""
        method = self._method(fn)
        ranks = range(self.world_size) if ranks is None else ranks
        return [
            (self._label(r), getattr(self._actors[r], method).remote(*args, **kwargs))
            for r in ranks
        ]

    def stream(self, rank: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Start generator method ``fn`` on ``rank``; a Ray ``ObjectRefGenerator`` hands out
        each value it yields as soon as it is made (``RolloutGroup.generate_stream``)."""
        method = getattr(self._actors[rank], self._method(fn))
        return method.options(num_returns="streaming").remote(*args, **kwargs)

    def label(self, rank: int) -> RankLabel:
        """How errors and progress lines name ``rank`` of this group."""
        return self._label(rank)

    def call_all(
        self, fn: Callable[..., Any], *args: Any, deadline: Deadline | None = None, **kwargs: Any
    ) -> list[Any]:
        """``fn`` on every rank with the same arguments; results in rank order. Fails fast;
        ``deadline`` (default: the group's) bounds the wait."""
        return self._wait(self.submit(fn, *args, **kwargs), fn, deadline)

    def call_rank(
        self,
        rank: int,
        fn: Callable[..., Any],
        *args: Any,
        deadline: Deadline | None = None,
        **kwargs: Any,
    ) -> Any:
        """``fn`` on one rank only (it must not need the other ranks)."""
        return self._wait(self.submit(fn, *args, ranks=[rank], **kwargs), fn, deadline)[0]

    def scatter(
        self,
        fn: Callable[..., Any],
        per_rank_args: Sequence[tuple],
        *,
        deadline: Deadline | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """``fn(*per_rank_args[r], **kwargs)`` on ranks ``0..len(per_rank_args)-1``."""
        if not 0 < len(per_rank_args) <= self.world_size:
            raise ValueError(
                f"worker group {self.name!r}: {len(per_rank_args)} argument tuples for "
                f"{self.world_size} ranks"
            )
        method = self._method(fn)
        refs = [
            (self._label(r), getattr(self._actors[r], method).remote(*args, **kwargs))
            for r, args in enumerate(per_rank_args)
        ]
        return self._wait(refs, fn, deadline)

    def _wait(
        self,
        refs: list[tuple[str, ray.ObjectRef]],
        fn: Callable[..., Any],
        deadline: Deadline | None = None,
    ) -> list[Any]:
        d = deadline or self.deadline
        try:
            return wait_labelled(refs, what=fn.__name__, timeout_s=d.seconds, timeout_key=d.key,
                                 timeout_note=d.note)  # fmt: skip
        except CallTimeoutError as err:
            raise self.with_stacks(err) from None

    def with_stacks(self, err: CallTimeoutError) -> CallTimeoutError:
        """``err`` with its stalled ranks' stacks, those on this machine (cluster/stacks.py)."""
        pids = {r: p.pid for r, p in self._local.items()} if err.role == self.name else {}
        return add_stacks(err, pids, f"worker group {self.name!r}")

    def dispatch_dp(
        self,
        fn: Callable[..., Any],
        batch: Batch,
        *args: Any,
        partitions: Sequence[Sequence[int]] | None = None,
        replicas: int = 1,
        deadline: Deadline | None = None,
        **kwargs: Any,
    ) -> Batch | list[Any]:
        """Give data-parallel group ``g`` the rows ``partitions[g]`` of ``batch`` (default:
        equal consecutive chunks) and gather. A group is ``replicas`` consecutive ranks that
        all receive the same rows (a sequence-parallel group). ``Batch`` results of each
        group's first rank are concatenated back into the original row order; anything
        else comes back as a per-rank list."""
        if replicas < 1 or self.world_size % replicas:
            raise ValueError(f"{replicas} replicas do not divide the {self.world_size} ranks")
        groups = self.world_size // replicas
        if partitions is None:
            if len(batch) % groups:
                raise ValueError(
                    f"{len(batch)} rows cannot be split evenly across {groups} "
                    f"data-parallel groups of {self.name!r}; make the batch size a multiple "
                    "of it"
                )
            size = len(batch) // groups
            partitions = [list(range(g * size, (g + 1) * size)) for g in range(groups)]
        if len(partitions) != groups:
            raise ValueError(f"{len(partitions)} partitions for {groups} data-parallel groups")
        inverse = restore_order(partitions)
        if len(inverse) != len(batch):
            raise ValueError(f"partitions cover {len(inverse)} rows but the batch has {len(batch)}")
        shards = [batch[np.asarray(p, dtype=np.int64)] for p in partitions]
        per_rank = [(shards[r // replicas], *args) for r in range(self.world_size)]
        results = self.scatter(fn, per_rank, deadline=deadline, **kwargs)
        if all(isinstance(r, Batch) for r in results):
            return Batch.concat(results[::replicas])[inverse]
        return results

    # ----------------------------------------------------------------- teardown
    def shutdown(self) -> None:
        """Kill the actors (and, on this machine, make sure their processes are gone: a
        stopped worker ignores Ray's request) and release a pool this group created."""
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as err:  # pragma: no cover - already dead
                logger.debug("kill %s: %s", self.name, err)
        self._actors = []
        reap(list(self._local.values()))
        self._local = {}
        if self._owned_pool is not None:
            self._owned_pool.remove()
            self._owned_pool = None

    def __len__(self) -> int:
        return self.world_size


def _avail() -> dict[str, float]:
    try:
        res = ray.available_resources()
        return {k: round(v, 2) for k, v in res.items() if k in ("CPU", "GPU")}
    except Exception:  # pragma: no cover
        return {}
