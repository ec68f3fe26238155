"""Resource pools: placement groups with one bundle per GPU (or per CPU slot on CPU).

Why placement groups: a role's ranks are reserved together (all or nothing, so a job never
half-starts and then waits forever), and bundle ``i`` pins rank ``i`` of every role placed
on the pool to one node/GPU. Two placements are supported:

* ``split``: actor and rollout each get their own pool (separate GPUs).
* ``colocated``: one pool; actor rank ``i`` and rollout worker ``i`` share bundle ``i``
  (half of its GPU each and their own CPUs, so Ray puts them on the same device; vLLM
  sleeps while the actor updates).

`place_roles` does both from the run's ``resources`` section, after refusing a Ray cluster
smaller than ``nnodes x gpus_per_node`` GPUs.

On CPU machines a "slot" is a fraction of a core (default 0.5 CPU): Ray's CPU counts are
logical, threads are set by ``OMP_NUM_THREADS``, and fractions let a 2-core machine host
two actor ranks and a rollout worker.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)

DEFAULT_CPU_SLOT = 0.5  # CPUs per worker slot on CPU-only clusters
DEFAULT_CPUS_PER_GPU_SLOT = 1.0
PLACEMENTS = ("split", "colocated")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def cluster_has_gpus() -> bool:
    """Whether workers should ask Ray for GPUs (a CPU-forced platform says no)."""
    from fipo_trainer.platform import cpu_forced

    if cpu_forced():
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass
class ResourcePool:
    """A placement group of identical bundles (see the module docstring)."""

    name: str
    bundles: list[dict[str, float]]
    strategy: str
    pg: PlacementGroup

    @classmethod
    def create(
        cls,
        num_bundles: int,
        *,
        cpus_per_bundle: float | None = None,
        gpus_per_bundle: float | None = None,
        strategy: str = "PACK",
        name: str = "pool",
        timeout_s: float = 120.0,
        extra: dict[str, float] | None = None,
    ) -> ResourcePool:
        """Reserve ``num_bundles`` bundles; raise a clear error if Ray cannot place them.

        ``extra``: custom resources each bundle asks for too (pins the pool to the nodes that
        have them)."""
        if num_bundles < 1:
            raise ValueError(f"resource pool {name!r}: num_bundles must be >= 1, got {num_bundles}")
        if strategy not in STRATEGIES:
            raise ValueError(f"resource pool {name!r}: strategy {strategy!r} not in {STRATEGIES}")
        if gpus_per_bundle is None:
            gpus_per_bundle = 1.0 if cluster_has_gpus() else 0.0
        if cpus_per_bundle is None:
            cpus_per_bundle = DEFAULT_CPUS_PER_GPU_SLOT if gpus_per_bundle > 0 else DEFAULT_CPU_SLOT
        if cpus_per_bundle <= 0 and gpus_per_bundle <= 0:
            raise ValueError(f"resource pool {name!r}: a bundle needs CPUs or GPUs")
        bundle = {"CPU": float(cpus_per_bundle)}
        if gpus_per_bundle > 0:
            bundle["GPU"] = float(gpus_per_bundle)
        bundle.update({k: float(v) for k, v in (extra or {}).items()})
        bundles = [dict(bundle) for _ in range(num_bundles)]
        pg = placement_group(bundles, strategy=strategy, name=f"fipo_{name}")
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise RuntimeError(
                f"resource pool {name!r}: Ray could not reserve {num_bundles} x {bundle} "
                f"(strategy {strategy}) within {timeout_s:.0f}s. Cluster total "
                f"{_fmt(ray.cluster_resources())}, available {_fmt(ray.available_resources())}. "
                "Lower the world size or the per-worker CPUs/GPUs, or add nodes"
                + (
                    f" (custom resources {sorted(extra)} exist only on nodes started with "
                    "ray start --resources)."
                    if extra
                    else "."
                )
            ) from None
        logger.info("resource pool %s: %d x %s", name, num_bundles, bundle)
        return cls(name=name, bundles=bundles, strategy=strategy, pg=pg)

    def __len__(self) -> int:
        return len(self.bundles)

    @property
    def use_gpu(self) -> bool:
        return self.bundles[0].get("GPU", 0) > 0

    def scheduling(self, bundle_index: int) -> PlacementGroupSchedulingStrategy:
        """Ray scheduling strategy that pins a task/actor to one bundle."""
        if not 0 <= bundle_index < len(self):
            raise IndexError(
                f"pool {self.name!r} has {len(self)} bundles, asked for {bundle_index}"
            )
        return PlacementGroupSchedulingStrategy(
            placement_group=self.pg,
            placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=False,
        )

    def remove(self) -> None:
        """Release the reservation (actors in it must be gone first)."""
        try:
            remove_placement_group(self.pg)
        except Exception as err:  # pragma: no cover - already removed / Ray down
            logger.debug("removing pool %s: %s", self.name, err)


@dataclass(frozen=True)
class RolePlacement:
    """Where one role's workers go: which bundles of a pool and what each worker asks for."""

    pool: ResourcePool
    bundle_indices: tuple[int, ...]
    num_cpus_per_worker: float
    num_gpus_per_worker: float

    @property
    def world_size(self) -> int:
        return len(self.bundle_indices)

    @classmethod
    def whole_pool(cls, pool: ResourcePool, share: int = 1) -> RolePlacement:
        """One worker per bundle, taking ``1/share`` of each bundle."""
        b = pool.bundles[0]
        return cls(
            pool=pool,
            bundle_indices=tuple(range(len(pool))),
            num_cpus_per_worker=b.get("CPU", 0.0) / share,
            num_gpus_per_worker=b.get("GPU", 0.0) / share,
        )


def plan_placement(
    mode: str,
    *,
    actor_world_size: int,
    rollout_world_size: int,
    rollout_gpus_per_worker: int = 1,
    use_gpu: bool | None = None,
    cpus_per_slot: float | None = None,
    actor_cpus_per_worker: float | None = None,
    rollout_cpus_per_worker: float | None = None,
    strategy: str = "PACK",
    timeout_s: float = 120.0,
    actor_extra: dict[str, float] | None = None,
    rollout_extra: dict[str, float] | None = None,
) -> dict[str, RolePlacement]:
    """Reserve resources for the actor and rollout roles; returns ``{"actor", "rollout"}``.

    ``rollout_world_size`` counts engines; ``rollout_gpus_per_worker`` is their tensor-parallel
    size k: an engine is k workers, one device each (split: one k-device bundle per engine,
    so an engine never spans nodes; colocated: k consecutive actor bundles).
    CPUs: each actor rank asks ``actor_cpus_per_worker`` and each rollout worker
    ``rollout_cpus_per_worker`` (a colocated slot reserves their sum); a role without its own
    figure takes ``cpus_per_slot`` (colocated: both halve one slot of that size).
    ``*_extra``: custom resources per bundle (colocated: both roles' in the shared bundle).
    """
    if mode not in PLACEMENTS:
        raise ValueError(f"placement {mode!r} is unknown; choose one of {PLACEMENTS}")
    if actor_world_size < 1 or rollout_world_size < 1:
        raise ValueError(
            f"world sizes must be >= 1 (actor {actor_world_size}, rollout {rollout_world_size})"
        )
    use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    gpu = 1.0 if use_gpu else 0.0
    actor_cpus = cpus_per_slot if actor_cpus_per_worker is None else actor_cpus_per_worker
    rollout_cpus = cpus_per_slot if rollout_cpus_per_worker is None else rollout_cpus_per_worker
    if mode == "split":
        actor_pool = ResourcePool.create(
            actor_world_size,
            cpus_per_bundle=actor_cpus,
            gpus_per_bundle=gpu,
            strategy=strategy,
            name="actor",
            timeout_s=timeout_s,
            extra=actor_extra,
        )
        try:
            rollout_pool = ResourcePool.create(
                rollout_world_size,
                cpus_per_bundle=rollout_cpus,
                gpus_per_bundle=gpu * rollout_gpus_per_worker,
                strategy=strategy,
                name="rollout",
                timeout_s=timeout_s,
                extra=rollout_extra,
            )
        except Exception:
            actor_pool.remove()
            raise
        k = rollout_gpus_per_worker
        per_engine = RolePlacement.whole_pool(rollout_pool)
        return {
            "actor": RolePlacement.whole_pool(actor_pool),
            # an engine's k TP ranks share its bundle (k GPUs: one each; one node)
            "rollout": RolePlacement(
                pool=rollout_pool,
                bundle_indices=tuple(b for b in per_engine.bundle_indices for _ in range(k)),
                num_cpus_per_worker=per_engine.num_cpus_per_worker / k,
                num_gpus_per_worker=per_engine.num_gpus_per_worker / k,
            ),
        }
    engine_ranks = rollout_world_size * rollout_gpus_per_worker
    if actor_world_size % rollout_gpus_per_worker:
        raise ValueError(
            f"placement=colocated: rollout tensor_parallel_size {rollout_gpus_per_worker} must "
            f"divide the actor world size {actor_world_size} (an engine spans that many devices)"
        )
    if engine_ranks > actor_world_size:
        raise ValueError(
            f"placement=colocated puts one engine rank on each actor device: {rollout_world_size} "
            f"engines x tensor_parallel_size {rollout_gpus_per_worker} = {engine_ranks} devices "
            f"but the actor has {actor_world_size}"
        )
    own = actor_cpus_per_worker is not None and rollout_cpus_per_worker is not None
    pool = ResourcePool.create(
        actor_world_size,
        cpus_per_bundle=actor_cpus + rollout_cpus if own else cpus_per_slot,
        gpus_per_bundle=gpu,
        strategy=strategy,
        name="colocated",
        timeout_s=timeout_s,
        extra={**(rollout_extra or {}), **(actor_extra or {})},
    )
    half = RolePlacement.whole_pool(pool, share=2)
    actor = dataclasses.replace(half, num_cpus_per_worker=actor_cpus) if own else half
    return {
        "actor": actor,
        "rollout": RolePlacement(
            pool=pool,
            bundle_indices=tuple(range(engine_ranks)),
            num_cpus_per_worker=rollout_cpus if own else half.num_cpus_per_worker,
            num_gpus_per_worker=half.num_gpus_per_worker,
        ),
    }


class ClusterSizeError(RuntimeError):
    """The Ray cluster is smaller than the run's ``resources.nnodes x gpus_per_node``."""


def cluster_shortfall(
    cluster: dict[str, float], alive_nodes: int, *, nnodes: int, gpus_per_node: int
) -> str | None:
    """Why a cluster with these totals cannot host the run, or None when it can."""
    need_gpus = nnodes * gpus_per_node
    have_gpus = float(cluster.get("GPU", 0.0))
    if gpus_per_node > 0 and have_gpus < need_gpus:
        return (
            f"the Ray cluster has {have_gpus:g} GPUs on {alive_nodes} node(s) but "
            f"resources.nnodes x resources.gpus_per_node = {nnodes} x {gpus_per_node} = "
            f"{need_gpus} GPUs are asked for: join the missing nodes (scripts/ray_cluster.sh "
            f"worker HEAD_ADDR --num-gpus {gpus_per_node} on each) or lower resources.nnodes / "
            "resources.gpus_per_node"
        )
    if alive_nodes < nnodes:
        return (
            f"the Ray cluster has {alive_nodes} node(s) but resources.nnodes={nnodes}: join the "
            "missing nodes (scripts/ray_cluster.sh worker HEAD_ADDR on each) or lower "
            "resources.nnodes"
        )
    return None


def check_cluster_size(*, nnodes: int, gpus_per_node: int) -> None:
    """Refuse to start on a Ray cluster smaller than ``nnodes x gpus_per_node`` GPUs."""
    alive = sum(1 for node in ray.nodes() if node.get("Alive", node.get("alive", False)))
    problem = cluster_shortfall(
        dict(ray.cluster_resources()), alive, nnodes=nnodes, gpus_per_node=gpus_per_node
    )
    if problem:
        raise ClusterSizeError(problem)


def place_roles(
    resources: Any, *, rollout_tensor_parallel_size: int = 1, timeout_s: float = 120.0
) -> dict[str, RolePlacement]:
    """The run's placement from its ``resources`` section (`ResourcesConfig`'s fields).

    Checks the joined cluster's size first (`check_cluster_size`); GPUs are used when
    ``gpus_per_node > 0``; every worker asks its role's ``cpus_per_*_worker``.
    """
    check_cluster_size(nnodes=resources.nnodes, gpus_per_node=resources.gpus_per_node)
    return plan_placement(
        resources.placement,
        actor_world_size=resources.actor_world_size,
        rollout_world_size=resources.rollout_workers,
        rollout_gpus_per_worker=rollout_tensor_parallel_size,
        use_gpu=resources.gpus_per_node > 0,
        actor_cpus_per_worker=resources.cpus_per_actor_worker,
        rollout_cpus_per_worker=resources.cpus_per_rollout_worker,
        timeout_s=timeout_s,
        actor_extra=dict(resources.actor_bundle_resources),
        rollout_extra=dict(resources.rollout_bundle_resources),
    )


def release(placements: dict[str, RolePlacement] | Sequence[RolePlacement]) -> None:
    """Remove the pools behind some placements (each pool once)."""
    items = placements.values() if isinstance(placements, dict) else placements
    seen: set[int] = set()
    for p in items:
        if id(p.pool) not in seen:
            seen.add(id(p.pool))
            p.pool.remove()


def _fmt(resources: dict[str, float]) -> str:
    keep = {k: round(v, 2) for k, v in resources.items() if k in ("CPU", "GPU", "memory")}
    if "memory" in keep:
        keep["memory"] = f"{keep['memory'] / 2**30:.1f}GiB"
    return str(keep)
