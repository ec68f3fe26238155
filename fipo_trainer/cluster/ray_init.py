"""Start a local Ray cluster or join an existing one, with the platform's worker env.

Why a wrapper: the defaults that matter here are easy to forget (dashboard off halves the
head's memory on small machines; every worker must start with ``worker_env()`` so DeepSpeed
picks the right accelerator and CPU ranks do not oversubscribe cores).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from fipo_trainer.platform import forwarded_env, worker_env

logger = logging.getLogger(__name__)

LOCAL_ADDRESSES = (None, "", "local")


def _driver_env_vars() -> dict[str, str]:
    # A driver that forced CPU must not let its workers pick CUDA on their own.
    return {**worker_env(), **forwarded_env()}


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    namespace: str | None = None,
    object_store_memory: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    log_to_driver: bool = True,
) -> dict[str, float]:
    """Start (``address`` None/"local") or join (``"auto"``, ``"ray://host:10001"``) Ray.

    Returns the cluster's total resources. Idempotent: if Ray is already initialised in this
    process it is reused and a mismatch is only logged. Resource arguments apply to a local
    start only; passing them when joining raises ValueError (the cluster decides them).
    """
    if ray.is_initialized():
        logger.info("Ray already initialised in this process; reusing it")
        return dict(ray.cluster_resources())
    env = {**_driver_env_vars(), **(runtime_env or {}).get("env_vars", {})}
    rt_env = {**(runtime_env or {}), "env_vars": env}
    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "runtime_env": rt_env,
        "log_to_driver": log_to_driver,
    }
    if address in LOCAL_ADDRESSES:
        kwargs.update(
            num_cpus=num_cpus if num_cpus is not None else os.cpu_count() or 1,
            num_gpus=num_gpus,
            include_dashboard=False,
            object_store_memory=object_store_memory,
        )
    else:
        given = {
            k: v
            for k, v in (
                ("num_cpus", num_cpus),
                ("num_gpus", num_gpus),
                ("object_store_memory", object_store_memory),
            )
            if v is not None
        }
        if given:
            raise ValueError(
                f"ray address {address!r} joins an existing cluster, whose resources are fixed "
                f"when it starts; drop {sorted(given)} from the ray config (or use address: local)"
            )
        kwargs["address"] = address
    ray.init(**kwargs)
    resources = dict(ray.cluster_resources())
    logger.info("Ray ready (%s): %s", address or "local", resources)
    return resources


def shutdown_ray() -> None:
    """Stop this process's Ray connection (and the local cluster if it started one)."""
    if ray.is_initialized():
        ray.shutdown()
