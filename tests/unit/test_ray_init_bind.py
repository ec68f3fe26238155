"""Where a run's own servers listen (issue 12, security): loopback in a local run, the node
IP on a cluster, never every interface. No Ray is started here."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from fipo_trainer.cluster import ray_init
from fipo_trainer.cluster import worker as worker_mod
from fipo_trainer.cluster.weight_transport import WeightSyncReceiver, WeightSyncSender


def _listening() -> set[tuple[str, int]]:
    """This process's listening TCP sockets, as (ip, port)."""
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def _loopback(ip: str) -> bool:
    """Independent of the code under test: 127/8, ::1 and IPv4-mapped 127/8."""
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _not_loopback(addrs: set[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted(a for a in addrs if not _loopback(a[0]))


@pytest.mark.parametrize("address", [None, "", "local"])
def test_local_run_binds_loopback(address):
    assert ray_init.bind_address(address, node_ip="10.1.2.3") == "127.0.0.1"


def test_cluster_run_binds_the_node_ip_never_a_wildcard(monkeypatch):
    assert ray_init.bind_address("auto", node_ip="10.1.2.3") == "10.1.2.3"
    monkeypatch.setattr(worker_mod, "node_ip", lambda: "10.9.8.7")
    assert ray_init.bind_address("ray://head:10001") == "10.9.8.7"
    assert worker_mod.bind_host() == "10.9.8.7"
    for wildcard in ("0.0.0.0", "::", ""):
        with pytest.raises(ValueError, match="every interface"):
            ray_init.bind_address("auto", node_ip=wildcard)
        with pytest.raises(ValueError, match="every interface"):
            worker_mod.bind_host(wildcard)


def test_is_loopback():
    for host in ("127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1", "localhost"):
        assert worker_mod.is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.0.2.2", "fd00::2", "example.org"):
        assert not worker_mod.is_loopback(host), host


def test_local_network_env_keeps_a_users_own_settings():
    env = ray_init.local_network_env({})
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == worker_mod.loopback_interface()
    assert "GLOO_SOCKET_IFNAME" not in ray_init.local_network_env({"GLOO_SOCKET_IFNAME": "eth1"})


def test_local_start_asks_ray_for_a_loopback_node(monkeypatch):
    """ray.init gets 127.0.0.1 as the node IP *and* Ray's local-only switch, without which it
    resolves 127.0.0.1 back to the routable address; the switch is restored afterwards."""
    import ray
    from ray._private import ray_constants, services

    seen: dict = {}

    def fake_init(**kwargs):
        seen["kwargs"] = kwargs
        seen["resolved"] = services.resolve_ip_for_localhost(kwargs.get("_node_ip_address", "x"))
        seen["node_ip"] = services.get_node_ip_address()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_init.init_ray(None, 1)
    assert seen["kwargs"]["_node_ip_address"] == "127.0.0.1"
    assert seen["resolved"] == "127.0.0.1" and seen["node_ip"] == "127.0.0.1"
    assert seen["kwargs"]["include_dashboard"] is False
    env = seen["kwargs"]["runtime_env"]["env_vars"]
    assert env["GLOO_SOCKET_IFNAME"] == worker_mod.loopback_interface()
    assert ray_constants.ENABLE_RAY_CLUSTER is before

    ray_init.init_ray("auto")  # joining: Ray's own choice, nothing forced
    assert "_node_ip_address" not in seen["kwargs"]
    assert "GLOO_SOCKET_IFNAME" not in seen["kwargs"]["runtime_env"]["env_vars"]


@pytest.mark.parametrize("host", ["127.0.0.1", None])
def test_weight_sync_store_listens_on_its_host_only(monkeypatch, host):
    """The store used to listen on every interface (``0.0.0.0`` given explicitly for
    ``host=None``; torch's server ignores its host argument anyway)."""
    monkeypatch.setattr(worker_mod, "node_ip", lambda: "127.0.0.1")
    import fipo_trainer.cluster.weight_transport as transport

    monkeypatch.setattr(transport, "node_ip", lambda: "127.0.0.1")
    before = _listening()
    sender = WeightSyncSender(2, host=host, port=0, timeout_s=10, connect=False)
    new = _listening() - before
    assert sender.host == "127.0.0.1"
    assert any(port == sender.port for _, port in new), new
    assert not _not_loopback(new), new


def test_weight_sync_group_listens_on_loopback_while_streaming():
    """Store and gloo pairs of both ends, sampled while the group is up."""
    before = _listening()
    sender = WeightSyncSender(2, host="127.0.0.1", port=0, timeout_s=30, connect=False)
    got: dict = {}

    def receive():
        rcv = WeightSyncReceiver("127.0.0.1", sender.port, 2, 1, timeout_s=30)
        got["during"] = _listening() - before
        got["tensors"] = [(n, t.clone()) for n, t in rcv.receive()]

    t = threading.Thread(target=receive)
    t.start()
    sender.connect()
    time.sleep(0.2)
    sender.send([("w", torch.arange(6.0))])
    t.join(30)
    assert got["tensors"][0][0] == "w" and torch.equal(got["tensors"][0][1], torch.arange(6.0))
    assert len(got["during"]) >= 2, got["during"]  # the store and at least one gloo listener
    assert not _not_loopback(got["during"]), got["during"]


_ONE_RANK = """
import psutil, socket
import torch.distributed as dist
from fipo_trainer.cluster.worker import DistInfo, init_torch_distributed
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
info = DistInfo(0, 1, "127.0.0.1", port)
init_torch_distributed(info, "gloo", timeout_s=30)
dist.barrier()
for c in psutil.Process().net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN:
        print("LISTEN", c.laddr.ip, c.laddr.port)
dist.destroy_process_group()
"""


def test_default_group_rendezvous_listens_on_master_addr_only():
    """Rank 0's store (MASTER_ADDR=127.0.0.1) is not on every interface, as
    ``init_method=tcp://...`` makes it."""
    out = subprocess.run(
        [sys.executable, "-c", _ONE_RANK], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    listens = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("LISTEN")]
    assert listens, out.stdout
    assert all(_loopback(ip) for ip, _ in listens), listens
