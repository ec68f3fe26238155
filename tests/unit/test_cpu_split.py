"""Disjoint cores for the engines and the actor ranks under async rollouts on CPU
(``cluster/cpu_split.py``): the plan, the pinning of every thread, when it applies."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fipo_trainer.cluster.cpu_split import (
    cores_per_worker,
    plan_cpu_split,
    split_cpus_for_overlap,
)


@pytest.mark.parametrize(
    ("cpus", "engines", "engine_cpus", "actor_cpus"),
    [
        ([0, 1], 1, ((0,),), (1,)),
        ([3, 1, 2, 0], 2, ((0,), (1,)), (2, 3)),
        ([5, 7, 9], 1, ((5,),), (7, 9)),  # a container's cores need not start at 0
    ],
)
def test_each_engine_process_gets_a_core_and_the_actor_the_rest(
    cpus, engines, engine_cpus, actor_cpus
):
    plan = plan_cpu_split(cpus, engines)
    assert plan.engine_cpus == engine_cpus and plan.actor_cpus == actor_cpus


@pytest.mark.parametrize(("cpus", "engines"), [([0], 1), ([0, 1], 2), ([0, 1], 0)])
def test_no_plan_when_the_actor_would_get_no_core(cpus, engines):
    assert plan_cpu_split(cpus, engines) is None


PIN = """
import os, threading, time
from fipo_trainer.cluster.cpu_split import pin_this_process, process_cpus
before = threading.Thread(target=time.sleep, args=(5,), daemon=True)
before.start()
pinned = pin_this_process([{core}])
after = threading.Thread(target=time.sleep, args=(5,), daemon=True)
after.start()
tids = [int(t) for t in os.listdir("/proc/self/task")]
print(pinned, process_cpus(), len(tids), sorted({{tuple(os.sched_getaffinity(t)) for t in tids}}))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to pin to one")
def test_pinning_reaches_every_thread_and_the_threads_started_later():
    core = max(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", PIN.format(core=core)], capture_output=True, text=True, check=True
    ).stdout.strip()
    pinned, now, threads, per_thread = out.split(" ", 3)
    assert pinned == now == f"[{core}]" and int(threads) >= 3
    assert per_thread == f"[({core},)]"  # one affinity over all threads, the pinned core


def resources(**kw):
    base = {"cpu_split": True, "placement": "split", "local": True}
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    ("res", "mode"),
    [
        (resources(), "off"),  # the roles take turns: each wants every core
        (resources(placement="colocated"), "one_step"),
        (resources(local=False), "one_step"),  # a joined cluster's cores are not ours
        (resources(cpu_split=False), "bounded"),
    ],
)
def test_nothing_is_pinned_without_overlap_on_this_machine(res, mode):
    # The groups are never asked: None would fail at the first call.
    assert split_cpus_for_overlap(res, mode, actor=None, rollout=None) is None


def test_a_worker_that_forks_engines_gets_a_core_for_each():
    # 2 workers x 2 engines (rollout.engines_per_worker=2) on 6 cores: 4 engine processes.
    plan = plan_cpu_split(range(6), 4)
    assert cores_per_worker(plan, 2) == [[0, 1], [2, 3]]
    assert plan.actor_cpus == (4, 5)
    assert cores_per_worker(plan_cpu_split(range(3), 2), 1) == [[0], [1]]
