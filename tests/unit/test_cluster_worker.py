"""Cluster pieces that need no running Ray: argument checks and rank bookkeeping."""

from __future__ import annotations

import pytest
import ray

from fipo_trainer.cluster import DistInfo, init_ray
from fipo_trainer.cluster.worker import Worker


def test_joining_a_cluster_refuses_local_resource_arguments():
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match=r"joins an existing cluster.*\['num_cpus'\]"):
        init_ray("auto", num_cpus=2)
    assert not ray.is_initialized()


def test_dist_info_env_round_trip(monkeypatch):
    info = DistInfo(
        rank=1, world_size=4, master_addr="10.0.0.2", master_port=2345, group_name="actor"
    )
    for key, value in info.env().items():
        monkeypatch.setenv(key, value)
    assert DistInfo.from_env() == info
    assert info.init_method == "tcp://10.0.0.2:2345"
    assert DistInfo(0, 1, "fe80::1", 5).init_method == "tcp://[fe80::1]:5"
    worker = Worker()
    assert (worker.rank, worker.world_size) == (1, 4)
    assert worker.health()["group"] == "actor"
    assert worker.run(lambda w, x: w.rank + x, 10) == 11
