"""Security (issue 12): a local run listens on loopback only.

A short training run on a fresh local Ray, while a thread of the test process samples
every listening socket of the run's own processes (the driver and all its descendants:
GCS, raylet, the agents with their Prometheus ports, the actor and rollout workers with
their gRPC ports, rendezvous stores and gloo pairs, the reward pool).
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading

import psutil
import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.cluster import leftovers
from fipo_trainer.cluster.ray_init import shutdown_ray
from fipo_trainer.trainer.config import prepare_config
from fipo_trainer.trainer.loop import run_training

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

RUN = [
    "resources.actor_world_size=2",  # gloo pairs between ranks, beside the forked engines
    "actor.ppo_max_token_len_per_gpu=1024",
    "rollout.engines_per_worker=2",
    "trainer.total_training_steps=2",
    "trainer.test_freq=0",
    "trainer.val_before_train=false",
    "trainer.plot=false",
    "trainer.export_hf=false",
    "trainer.rollout_dump_freq=0",
    "trainer.loggers=[console,jsonl]",
    "algorithm.filter_groups.on_exhausted=proceed",
]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _title(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
        return cmd[0] if cmd and cmd[0].startswith("ray::") else proc.name()
    except psutil.Error:
        return "?"


class ListenSampler(threading.Thread):
    """Collects (process title, ip, port) of every LISTEN socket of this process tree."""

    def __init__(self, interval_s: float = 0.5, watch=None) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.watch = watch  # a run dir: did its Ray session record appear while it ran?
        self.record: leftovers.SessionRecord | None = None
        self.stop = threading.Event()
        self.seen: set[tuple[str, str, int]] = set()
        self.samples = 0

    def sample(self) -> None:
        me = psutil.Process()
        procs = {me.pid: me}
        with contextlib.suppress(psutil.Error):
            procs |= {p.pid: p for p in me.children(recursive=True)}
        titles: dict[int, str] = {}
        for conn in psutil.net_connections(kind="inet"):
            if conn.status != psutil.CONN_LISTEN or conn.pid not in procs:
                continue
            if conn.pid not in titles:
                titles[conn.pid] = _title(procs[conn.pid])
            self.seen.add((f"{titles[conn.pid]}[{conn.pid}]", conn.laddr.ip, conn.laddr.port))
        if self.watch is not None and self.record is None:
            with contextlib.suppress(OSError, ValueError):
                self.record = leftovers.read_record(self.watch)
        self.samples += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval_s)


def test_local_run_listens_on_loopback_only(tmp_path):
    shutdown_ray()  # a fresh local Ray, started by this run (and stopped by it)
    run_dir = tmp_path / "run"
    sampler = ListenSampler(watch=run_dir)
    sampler.start()
    try:
        cfg = prepare_config(compose_config([*RUN, f"trainer.run_dir={run_dir}"]))
        result = run_training(cfg)
    finally:
        sampler.stop.set()
        sampler.join(10)
        shutdown_ray()
    # the run recorded its local Ray session while it ran (for the next start's orphan
    # report) and removed it when it stopped its Ray
    assert sampler.record is not None and sampler.record.node_ip == "127.0.0.1"
    assert leftovers.read_record(run_dir) is None, "a clean shutdown keeps no session record"
    assert result.steps == 2
    owners = {owner.split("[")[0] for owner, _, _ in sampler.seen}
    # the sampler saw the run's processes, not just the driver
    assert {"gcs_server", "raylet"} <= owners, owners
    assert sum(o.startswith("ray::") for o in owners) >= 3, owners
    exposed = sorted(s for s in sampler.seen if not _loopback(s[1]))
    assert not exposed, f"listening beyond loopback in a local run: {exposed}"
