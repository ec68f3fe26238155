"""Cluster pieces that need no running Ray: argument checks and rank bookkeeping."""

from __future__ import annotations

import datetime
import random
import socket

import pytest
import ray

from fipo_trainer.cluster import DistInfo, init_ray
from fipo_trainer.cluster.worker import (
    PROBED_PORTS_FROM,
    Worker,
    ephemeral_ports,
    free_port,
    listen_socket,
    tcp_store,
)


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


def test_a_rendezvous_port_is_drawn_outside_the_range_outgoing_connections_use():
    """The port rank 0 binds seconds after the driver probed it: one from the kernel's
    ephemeral range can be taken meanwhile by any outgoing connection (CI saw ``Address
    already in use`` at the actor's store), one below it only by an explicit bind."""
    low, _ = ephemeral_ports()
    for _ in range(20):
        port = free_port("127.0.0.1")
        assert PROBED_PORTS_FROM <= port < low, port
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_drawn_port_that_is_taken_is_skipped():
    draws = random.Random(7)
    first = draws.randrange(PROBED_PORTS_FROM, ephemeral_ports()[0])
    second = draws.randrange(PROBED_PORTS_FROM, ephemeral_ports()[0])
    with listen_socket("127.0.0.1", first):
        assert free_port("127.0.0.1", rng=random.Random(7)) == second


def test_the_kernels_pick_when_no_range_is_left_below_the_ephemeral_one(tmp_path, monkeypatch):
    narrow = tmp_path / "range"
    narrow.write_text(f"{PROBED_PORTS_FROM + 10}\t60999\n")
    monkeypatch.setattr(
        "fipo_trainer.cluster.worker.ephemeral_ports", lambda: ephemeral_ports(str(narrow))
    )
    assert ephemeral_ports(str(narrow)) == (PROBED_PORTS_FROM + 10, 60999)
    assert ephemeral_ports(str(tmp_path / "missing")) == (32768, 60999)
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port("127.0.0.1")))  # still a free port


def test_a_group_of_one_serves_its_store_on_any_free_port():
    """No other rank needs the agreed port; one taken meanwhile must not fail the start."""
    with listen_socket("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        store = tcp_store("127.0.0.1", port, 1, is_master=True,
                          timeout=datetime.timedelta(seconds=10))  # fmt: skip
        assert store.port != port
        store.set("k", "v")
        assert store.get("k") == b"v"
