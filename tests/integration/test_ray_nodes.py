"""The private multi-node cluster of the e2e tests recovers from a node that fails to start.

CI once lost the multi-node tests to one ``ray start --head`` whose raylet missed Ray's fixed
30 s registration window. Here the first head cannot start for sure (its GCS port is taken):
the helper must kill what it started, pick fresh ports, start again, and keep the first
failure, with its diagnosis, in the log.
"""

from __future__ import annotations

import socket

import pytest

from tests.helpers.ray_nodes import RayNodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_a_head_that_fails_to_start_is_retried_on_fresh_ports() -> None:
    nodes = RayNodes()
    squatted = nodes.gcs_port
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", squatted))
    squatter.listen()
    try:
        nodes.start_head({"fipo_node_test": 1}, num_cpus=1)
        assert nodes.gcs_port != squatted
        assert len(nodes.log) == 2, nodes.log
        first, second = nodes.log
        assert f"127.0.0.1:{nodes.dashboard_port}" in second  # ray start names the new dashboard
        # Ray's words for the failed head depend on timing: "Failed to start GCS" once the
        # squatted server has died, "Timed out while waiting for GCS" on a loaded machine.
        assert "GCS" in first and "ray_cluster.sh head" in first, first
        assert "load average" in first and "gcs_server.out" in first, first
        alive = nodes.processes()
        assert any("gcs_server" in " ".join(p.cmdline()) for p in alive)
        assert all(str(squatted) not in " ".join(p.cmdline()) for p in alive)
    finally:
        squatter.close()
        nodes.stop()
    assert not nodes.processes()
