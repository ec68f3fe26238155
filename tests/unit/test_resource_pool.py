"""Cluster-size check of placement (pure): a joined Ray cluster smaller than
resources.nnodes x gpus_per_node is refused with both sizes named."""

from __future__ import annotations

from fipo_trainer.cluster.resource_pool import cluster_shortfall


def test_too_few_gpus_names_both_sizes():
    msg = cluster_shortfall({"CPU": 64, "GPU": 8}, 1, nnodes=4, gpus_per_node=8)
    assert "has 8 GPUs on 1 node(s)" in msg
    assert "resources.nnodes x resources.gpus_per_node = 4 x 8 = 32 GPUs" in msg


def test_too_few_nodes_on_cpu():
    msg = cluster_shortfall({"CPU": 8}, 1, nnodes=2, gpus_per_node=0)
    assert "has 1 node(s) but resources.nnodes=2" in msg


def test_a_cluster_that_fits_or_is_larger_passes():
    assert cluster_shortfall({"CPU": 64, "GPU": 32}, 4, nnodes=4, gpus_per_node=8) is None
    assert cluster_shortfall({"CPU": 128, "GPU": 64}, 8, nnodes=4, gpus_per_node=8) is None
    assert cluster_shortfall({"CPU": 2}, 1, nnodes=1, gpus_per_node=0) is None
