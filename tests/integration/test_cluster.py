"""Worker groups on a real local Ray cluster: ranks/env, dispatch, start-up failures."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
import torch

from fipo_trainer.cluster import (
    ResourcePool,
    Worker,
    WorkerCallError,
    WorkerGroup,
    WorkerStartupError,
    init_ray,
    plan_placement,
    release,
    shutdown_ray,
)
from fipo_trainer.data.batch import Batch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Ray workers cannot import this test module by name: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class EchoWorker(Worker):
    def __init__(self, tag: str = "x") -> None:
        import gc

        super().__init__()
        self.tag = tag
        self.gc_at_init = gc.isenabled()

    def env(self) -> dict[str, str]:
        keys = (
            "RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "OMP_NUM_THREADS",
            "DS_ACCELERATOR",
        )
        return {k: os.environ.get(k, "") for k in keys} | {"tag": self.tag}

    def gc_state(self) -> dict[str, object]:
        import gc

        return {"at_init": self.gc_at_init, "now": gc.isenabled(), "frozen": gc.get_freeze_count()}

    def triton_state(self) -> dict[str, bool]:
        import importlib.util
        import sys

        import torch._dynamo  # noqa: F401 - what imports triton in an actor rank (transformers)

        return {
            "hidden": "triton" in sys.modules and sys.modules["triton"] is None,
            "found": importlib.util.find_spec("triton") is not None,
        }

    def double(self, batch: Batch) -> Batch:
        return Batch({"y": batch["x"] * 2, "rank": torch.full((len(batch),), self.rank)})

    def fail_on(self, rank: int) -> int:
        if self.rank == rank:
            raise RuntimeError(f"deliberate failure on rank {rank}")
        return self.rank

    def allreduce(self) -> float:
        import torch.distributed as dist

        from fipo_trainer.cluster import init_torch_distributed

        init_torch_distributed(self.dist_info, "gloo", timeout_s=60)
        t = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(t)
        return float(t.item())


def health_check(self) -> None:
    """Not a method of any worker class."""


class BrokenWorker(Worker):
    def __init__(self, bad_rank: int = 1) -> None:
        super().__init__()
        if self.rank == bad_rank:
            raise FileNotFoundError("model path /nonexistent/model does not exist")


class SlowWorker(Worker):
    def __init__(self) -> None:
        super().__init__()
        if self.rank == 1:
            time.sleep(600)  # e.g. stuck waiting for a peer that never comes


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    init_ray(num_cpus=2)
    yield
    shutdown_ray()


def test_ranks_env_and_collective():
    group = WorkerGroup(
        EchoWorker, 2, init_kwargs={"tag": "hello"}, name="echo", num_cpus_per_worker=0.25
    )
    try:
        envs = group.call_all(EchoWorker.env)
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
        assert {e["OMP_NUM_THREADS"] for e in envs} == {"1"}  # worker_env() on CPU
        assert {e["DS_ACCELERATOR"] for e in envs} == {"cpu"}
        assert {e["tag"] for e in envs} == {"hello"}
        assert group.call_rank(1, EchoWorker.fail_on, 0) == 1
        with pytest.raises(TypeError, match=r"EchoWorker\.env\), not the string"):
            group.call_all("env")
        with pytest.raises(AttributeError, match="EchoWorker has no method 'health_check'"):
            group.call_all(health_check)  # a function, but not one of EchoWorker's
        # Master address/port really work for torch.distributed (gloo).
        assert group.call_all(EchoWorker.allreduce) == [3.0, 3.0]
    finally:
        group.shutdown()


def test_workers_start_with_the_gc_paused_and_settle_it_at_the_probe():
    """init_ray's setup hook pauses the GC before the worker class is imported; the start-up
    probe freezes the start-up heap and turns it back on (fipo_trainer.startup)."""
    group = WorkerGroup(EchoWorker, 1, name="gc", num_cpus_per_worker=0.25)
    try:
        (state,) = group.call_all(EchoWorker.gc_state)
        assert state["at_init"] is False  # paused while the worker imported and built
        assert state["now"] is True
        assert state["frozen"] > 10_000  # torch, Ray, this package: frozen, not rescanned
    finally:
        group.shutdown()


def test_cpu_workers_do_not_load_triton():
    """On CPU the setup hook hides triton before the worker imports anything: torch._dynamo
    (which transformers imports) still loads, through its no-triton path."""
    group = WorkerGroup(EchoWorker, 1, name="triton", num_cpus_per_worker=0.25)
    try:
        (state,) = group.call_all(EchoWorker.triton_state)
        assert state == {"hidden": True, "found": False}
    finally:
        group.shutdown()


def test_dispatch_dp_restores_row_order():
    group = WorkerGroup(EchoWorker, 2, name="dispatch", num_cpus_per_worker=0.25)
    try:
        batch = Batch({"x": torch.arange(6.0)})
        out = group.dispatch_dp(EchoWorker.double, batch)
        assert out["y"].tolist() == [0, 2, 4, 6, 8, 10]
        assert out["rank"].tolist() == [0, 0, 0, 1, 1, 1]
        parts = [[5, 0, 3], [1, 4, 2]]
        out = group.dispatch_dp(EchoWorker.double, batch, partitions=parts)
        assert out["y"].tolist() == [0, 2, 4, 6, 8, 10]
        assert out["rank"].tolist() == [0, 1, 1, 0, 1, 0]
        with pytest.raises(ValueError, match="cannot be split evenly"):
            group.dispatch_dp(EchoWorker.double, Batch({"x": torch.arange(5.0)}))
    finally:
        group.shutdown()


def test_method_error_names_the_rank():
    group = WorkerGroup(EchoWorker, 2, name="failing", num_cpus_per_worker=0.25)
    try:
        with pytest.raises(
            WorkerCallError, match=r"rank 1 raised in fail_on[\s\S]*deliberate failure"
        ):
            group.call_all(EchoWorker.fail_on, 1)
    finally:
        group.shutdown()


def test_worker_raising_in_init_gives_clear_error_fast():
    start = time.monotonic()
    with pytest.raises(WorkerStartupError) as info:
        WorkerGroup(BrokenWorker, 2, name="broken", num_cpus_per_worker=0.25, startup_timeout_s=120)
    msg = str(info.value)
    assert "'broken'" in msg and "rank 1" in msg and "BrokenWorker" in msg
    assert "FileNotFoundError" in msg and "/nonexistent/model" in msg
    assert time.monotonic() - start < 60
    # Its actors and private placement group are gone: the whole cluster is free again.
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2)


def test_unplaceable_pool_fails_with_resources_in_message():
    with pytest.raises(RuntimeError, match=r"could not reserve 2 x \{'CPU': 8.0\}.*Cluster total"):
        ResourcePool.create(2, cpus_per_bundle=8, gpus_per_bundle=0, name="huge", timeout_s=2)


def test_startup_timeout_names_pending_ranks():
    start = time.monotonic()
    with pytest.raises(
        WorkerStartupError, match=r"rank\(s\) \[1\] did not finish __init__ within 10s"
    ):  # 10 s: on a loaded 2-core machine even rank 0's process can take > 3 s to start
        WorkerGroup(SlowWorker, 2, name="slow", num_cpus_per_worker=0.25, startup_timeout_s=10)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("mode", ["split", "colocated"])
def test_placements(mode):
    placements = plan_placement(mode, actor_world_size=2, rollout_world_size=1, cpus_per_slot=0.5)
    try:
        actor, rollout = placements["actor"], placements["rollout"]
        if mode == "split":
            assert actor.pool is not rollout.pool
            assert actor.num_cpus_per_worker == 0.5
        else:
            assert actor.pool is rollout.pool
            assert actor.num_cpus_per_worker == rollout.num_cpus_per_worker == 0.25
        a = WorkerGroup(EchoWorker, 2, pool=actor, name=f"{mode}-actor")
        r = WorkerGroup(EchoWorker, 1, pool=rollout, name=f"{mode}-rollout")
        try:
            assert [e["RANK"] for e in a.call_all(EchoWorker.env)] == ["0", "1"]
            assert r.call_all(EchoWorker.env)[0]["WORLD_SIZE"] == "1"
        finally:
            a.shutdown()
            r.shutdown()
    finally:
        release(placements)


class NapWorker(Worker):
    """A worker whose start-up takes 5 s (an import-heavy engine, without the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.init_began = time.time()
        time.sleep(5.0)
        self.init_ended = time.time()

    def init_interval(self) -> tuple[float, float]:
        return self.init_began, self.init_ended


def test_groups_started_without_waiting_start_together():
    """``wait=False`` returns once the actors are created, so two roles' start-ups overlap
    (the trainer waits once for the actor ranks and the rollout engines).

    Overlap is read from the workers' own clocks (when each ``__init__`` began and ended),
    not from a wall-clock bound that a loaded CI machine can miss by a fraction of a second.
    """
    start = time.monotonic()
    a = WorkerGroup(NapWorker, 2, name="nap-a", num_cpus_per_worker=0.25, wait=False)
    b = WorkerGroup(NapWorker, 1, name="nap-b", num_cpus_per_worker=0.25, wait=False)
    try:
        assert time.monotonic() - start < 5.0  # neither waited for a 5 s __init__
        a.wait_ready()
        b.wait_ready()
        b.wait_ready()  # idempotent
        assert len(a.worker_info) == 2 and len(b.worker_info) == 1
        (b_began, b_ended) = b.call_rank(0, NapWorker.init_interval)
        for a_began, a_ended in a.call_all(NapWorker.init_interval):
            # Sequential start-ups would put one group's 5 s nap wholly after the other's.
            overlap = min(a_ended, b_ended) - max(a_began, b_began)
            assert overlap > 2.5, f"nap-a and nap-b start-ups overlapped only {overlap:.1f}s"
    finally:
        a.shutdown()
        b.shutdown()


def test_failure_of_a_group_started_without_waiting_surfaces_in_wait_ready():
    group = WorkerGroup(BrokenWorker, 2, name="broken-later", num_cpus_per_worker=0.25, wait=False)
    with pytest.raises(WorkerStartupError, match="FileNotFoundError"):
        group.wait_ready()
    assert group._actors == []  # shut down
