"""place_roles on a local Ray cluster: every resources.* key it reads changes the
reservation (cpus_per_*_worker per role, gpus_per_node / nnodes against the cluster)."""

from __future__ import annotations

import pytest

from fipo_trainer.cluster import init_ray, release, shutdown_ray
from fipo_trainer.cluster.resource_pool import ClusterSizeError, place_roles
from fipo_trainer.trainer.config import ResourcesConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    init_ray(num_cpus=2)
    yield
    shutdown_ray()


def cpu(**kwargs) -> ResourcesConfig:
    base = {"gpus_per_node": 0, "actor_world_size": 2, "rollout_workers": 1}
    return ResourcesConfig(**{**base, **kwargs})


def test_split_bundles_follow_each_roles_cpus():
    placements = place_roles(cpu(cpus_per_actor_worker=0.5, cpus_per_rollout_worker=0.25))
    try:
        actor, rollout = placements["actor"], placements["rollout"]
        assert actor.pool.bundles == [{"CPU": 0.5}] * 2 and actor.num_cpus_per_worker == 0.5
        assert rollout.pool.bundles == [{"CPU": 0.25}] and rollout.num_cpus_per_worker == 0.25
        assert actor.num_gpus_per_worker == rollout.num_gpus_per_worker == 0
    finally:
        release(placements)


def test_colocated_slots_hold_both_roles_cpus():
    placements = place_roles(
        cpu(placement="colocated", cpus_per_actor_worker=0.5, cpus_per_rollout_worker=0.25)
    )
    try:
        actor, rollout = placements["actor"], placements["rollout"]
        assert actor.pool is rollout.pool and actor.pool.bundles == [{"CPU": 0.75}] * 2
        assert (actor.num_cpus_per_worker, rollout.num_cpus_per_worker) == (0.5, 0.25)
        assert rollout.bundle_indices == (0,)
    finally:
        release(placements)


def test_a_cluster_smaller_than_nnodes_x_gpus_per_node_is_refused():
    with pytest.raises(ClusterSizeError) as info:
        place_roles(cpu(gpus_per_node=4, nnodes=1))
    assert "has 0 GPUs on 1 node(s)" in str(info.value) and "1 x 4 = 4 GPUs" in str(info.value)
    with pytest.raises(ClusterSizeError, match=r"resources\.nnodes=2"):
        place_roles(cpu(nnodes=2, ray_address="auto"))
