"""The private test cluster never gives one port to two Ray components.

CI lost the multi-node retry test to ``ray start`` refusing a worker port that was also the
dashboard's: ports drawn in separate calls were not checked against each other.
"""

from __future__ import annotations

import re
import shutil

from fipo_trainer.cluster.worker import PROBED_PORTS_FROM, ephemeral_ports
from tests.helpers.ray_nodes import RayNodes, free_ports


def test_free_ports_skips_the_ports_it_is_told_to_avoid() -> None:
    first = free_ports(50)
    again = free_ports(50, avoid=set(first))
    assert len(set(again)) == 50
    assert not set(first) & set(again)
    # bound later by ``ray start``: none where an outgoing connection could take it first
    assert all(PROBED_PORTS_FROM <= p < ephemeral_ports()[0] for p in first + again)


def test_a_cluster_hands_out_every_port_once() -> None:
    nodes = RayNodes()
    try:
        given = [nodes.gcs_port, nodes.dashboard_port]
        for _ in range(20):  # 20 nodes' worth: 440 ports, a clash is likely without the check
            args = " ".join(nodes._node_args({"n": 1}, num_cpus=1))
            given += [int(p) for p in re.findall(r"\b(\d{4,5})\b", args)]
        assert len(given) == 2 + 20 * 22
        assert len(set(given)) == len(given)
    finally:
        shutil.rmtree(nodes.temp_dir, ignore_errors=True)
