"""Ray cluster plumbing: start-up, placement, worker groups, data-parallel dispatch.

The names below load on first use (``fipo_trainer.lazy_exports``), so starting Ray
(``cluster.ray_init``) imports no torch.
"""

from fipo_trainer.lazy_exports import lazy_getattr

_WHERE = {
    "balanced_partition": "dispatch",
    "dp_partition": "dispatch",
    "restore_order": "dispatch",
    "init_ray": "ray_init",
    "shutdown_ray": "ray_init",
    "ResourcePool": "resource_pool",
    "RolePlacement": "resource_pool",
    "cluster_has_gpus": "resource_pool",
    "plan_placement": "resource_pool",
    "release": "resource_pool",
    "WorkerCallError": "waiting",
    "WorkerStartupError": "waiting",
    "WorkerTimeoutError": "waiting",
    "wait_labelled": "waiting",
    "DistInfo": "worker",
    "Worker": "worker",
    "init_torch_distributed": "worker",
    "WorkerGroup": "worker_group",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE)
