"""Ray cluster plumbing: start-up, placement, worker groups, data-parallel dispatch."""

from fipo_trainer.cluster.dispatch import balanced_partition, dp_partition, restore_order
from fipo_trainer.cluster.ray_init import init_ray, shutdown_ray
from fipo_trainer.cluster.resource_pool import (
    ResourcePool,
    RolePlacement,
    cluster_has_gpus,
    plan_placement,
    release,
)
from fipo_trainer.cluster.waiting import (
    WorkerCallError,
    WorkerStartupError,
    WorkerTimeoutError,
    wait_labelled,
)
from fipo_trainer.cluster.worker import DistInfo, Worker, init_torch_distributed
from fipo_trainer.cluster.worker_group import WorkerGroup

__all__ = [
    "DistInfo",
    "ResourcePool",
    "RolePlacement",
    "Worker",
    "WorkerCallError",
    "WorkerGroup",
    "WorkerStartupError",
    "WorkerTimeoutError",
    "balanced_partition",
    "cluster_has_gpus",
    "dp_partition",
    "init_ray",
    "init_torch_distributed",
    "plan_placement",
    "release",
    "restore_order",
    "shutdown_ray",
    "wait_labelled",
]
