"""Start a local Ray cluster or join an existing one, with the platform's worker env.

Why a wrapper: the defaults that matter here are easy to forget (dashboard off halves the
head's memory on small machines; every worker must start with ``worker_env()`` so DeepSpeed
picks the right accelerator and CPU ranks do not oversubscribe cores).

A local start listens on loopback only. Ray binds its servers (GCS, raylet, object manager,
core workers, the agents and their Prometheus ``/metrics`` endpoints) to the node IP, and
only when that IP is 127.0.0.1 does it bind them all to loopback. ``ray.init`` turns
``_node_ip_address="127.0.0.1"`` back into the routable IP on Linux unless Ray's "no
multi-node cluster" switch (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the macOS/Windows
default) is off, so :func:`_loopback_node` turns it off for the start. The workers then see
127.0.0.1 as their node IP, so ``MASTER_ADDR`` and the weight-sync store are on loopback
too; gloo, NCCL and vLLM are told the same through the job's environment.
Joining a cluster changes nothing: the cluster binds to each node's IP.

A local start is also lean (``lean_head``): Ray's head starts two Python servers this run
never uses. The autoscaler monitor scales nothing on one fixed machine, and the dashboard
server, with the dashboard off, loads only its usage-stats module. Together they hold
≈ 130 MiB and cost ≈ 1.2 CPU-s of start-up. The trainer names resources it cannot place
itself (``resource_pool``), which the monitor would otherwise log.

With ``run_dir``, a local start also records its session there (``cluster.leftovers``) and
first reports processes a previous, killed run in that directory left running.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import ray

from fipo_trainer import startup
from fipo_trainer.cluster import leftovers
from fipo_trainer.cluster.worker import bind_host, loopback_interface
from fipo_trainer.platform import forwarded_env, worker_env

logger = logging.getLogger(__name__)

LOCAL_ADDRESSES = (None, "", "local")
LOOPBACK = "127.0.0.1"
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_record_dir: Path | None = None  # the run directory whose session record is ours
_atexit_registered = False


def is_local(address: str | None) -> bool:
    """True when ``address`` means "start a Ray on this machine" (not join a cluster)."""
    return address in LOCAL_ADDRESSES


def local_network_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Job env of a local run: gloo, NCCL and vLLM on loopback (a user's own setting wins)."""
    environ = dict(os.environ if environ is None else environ)
    iface = loopback_interface()
    wanted = {
        "GLOO_SOCKET_IFNAME": iface,  # default gloo devices use the hostname's address
        "NCCL_SOCKET_IFNAME": iface,  # NCCL bootstrap / socket transport
        "VLLM_HOST_IP": LOOPBACK,  # vLLM's own get_ip() asks the routing table
    }
    return {k: v for k, v in wanted.items() if k not in environ}


def bind_address(address: str | None, node_ip: str | None = None) -> str:
    """Where a run's servers listen: 127.0.0.1 for a local run, the node IP on a cluster.

    Never a wildcard (``0.0.0.0``/``::``): that would listen on every network.
    """
    if is_local(address):
        return LOOPBACK
    return bind_host(node_ip)


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let Ray take 127.0.0.1 as this node's IP while it starts (see module doc)."""
    from ray._private import ray_constants

    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    saved_env = os.environ.get(_RAY_CLUSTER_SWITCH)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_RAY_CLUSTER_SWITCH] = "0"  # inherited by the GCS, raylet and agents
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[_RAY_CLUSTER_SWITCH] = saved_env


# The head's servers a fixed one-machine run never uses: each is started by a method of
# Ray's Node that ``ray.init`` offers no switch for (``ray start --no-monitor`` exists).
LEAN_HEAD_SKIPS = ("start_monitor", "start_api_server")


@contextlib.contextmanager
def _lean_head(enabled: bool = True) -> Iterator[None]:
    """While Ray starts a head in this process, skip its autoscaler monitor and dashboard
    server (see module doc). A Ray without these methods starts in full, with a warning."""
    from ray._private.node import Node

    missing = [name for name in LEAN_HEAD_SKIPS if not callable(getattr(Node, name, None))]
    if not enabled or missing:
        if enabled:
            logger.warning(
                "Ray %s has no Node.%s: its full head starts", ray.__version__, ", Node.".join(missing)
            )
        yield
        return
    saved = {name: Node.__dict__.get(name) for name in LEAN_HEAD_SKIPS}
    for name in LEAN_HEAD_SKIPS:
        setattr(Node, name, _skip_head_process)
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(Node, name)
            else:
                setattr(Node, name, method)


def _skip_head_process(self: Any, **_: Any) -> None:
    return None


def _driver_env_vars() -> dict[str, str]:
    # A driver that forced CPU must not let its workers pick CUDA on their own.
    return {**worker_env(), **forwarded_env()}


class RayUnreachable(ConnectionError):
    """``resources.ray_address`` names a cluster that does not answer."""


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    namespace: str | None = None,
    object_store_memory: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    log_to_driver: bool = True,
    run_dir: str | os.PathLike[str] | None = None,
    lean_head: bool = True,
) -> dict[str, float]:
    """Start (``address`` None/"local") or join (``"auto"``, ``"ray://host:10001"``) Ray.

    Returns the cluster's total resources. Idempotent: if Ray is already initialised in this
    process it is reused and a mismatch is only logged. Resource arguments apply to a local
    start only; passing them when joining raises ValueError (the cluster decides them).
    A local start listens on 127.0.0.1 only; with ``run_dir`` it reports a previous run's
    leftover Ray processes there and records its own session (removed at clean shutdown).
    ``lean_head`` (local start only) skips the head's autoscaler monitor and dashboard server.
    """
    local = is_local(address)
    if local and run_dir is not None:
        leftovers.report_leftovers(run_dir)
    if ray.is_initialized():
        logger.info("Ray already initialised in this process; reusing it")
        return dict(ray.cluster_resources())
    user_env = (runtime_env or {}).get("env_vars", {})
    env = {**_driver_env_vars(), **user_env}
    if local:
        env = {**local_network_env({**os.environ, **user_env}), **env}
    rt_env = {**(runtime_env or {}), "env_vars": env}
    # Workers start with the GC paused (settled by their start-up probe) and, on CPU, without
    # triton (fipo_trainer.startup); a user's own hook wins.
    rt_env.setdefault("worker_process_setup_hook", startup.SETUP_HOOK)
    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "runtime_env": rt_env,
        "log_to_driver": log_to_driver,
    }
    if local:
        kwargs.update(
            num_cpus=num_cpus if num_cpus is not None else os.cpu_count() or 1,
            num_gpus=num_gpus,
            include_dashboard=False,
            object_store_memory=object_store_memory,
            _node_ip_address=LOOPBACK,
            # Every worker here starts with its own env (rank, platform), so workers Ray
            # prestarts for the driver are never used: on 2 cores they cost ~2 CPU-s at start.
            _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
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
    if local:
        _start_local(kwargs, lean_head=lean_head)
        if run_dir is not None:
            _record_session(Path(run_dir))
    else:
        try:
            ray.init(**kwargs)
        except ConnectionError as err:
            raise RayUnreachable(
                f"resources.ray_address={address!r}: no Ray cluster answered ({err}). Start "
                "it first (scripts/ray_cluster.sh head), or leave resources.ray_address unset "
                "to start a Ray on this machine"
            ) from err
    resources = dict(ray.cluster_resources())
    logger.info("Ray ready (%s): %s", address or "local", resources)
    return resources


LOCAL_START_ATTEMPTS = 2


def _start_local(
    kwargs: dict[str, Any], attempts: int = LOCAL_START_ATTEMPTS, *, lean_head: bool = True
) -> None:
    """``ray.init`` of a local node; a start that fails is cleaned up and tried again.

    Ray gives a new raylet a fixed 30 s to register with its GCS, which an overloaded machine
    can miss once; what the failed start spawned (GCS, raylet, agents) is killed first, so
    the retry starts clean. The last failure names Ray's logs and the usual causes.
    """
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            with _loopback_node(), _lean_head(lean_head):
                ray.init(**kwargs)
            return
        except (ValueError, TypeError):  # Ray refused its arguments: a retry would too
            raise
        except Exception as exc:
            with contextlib.suppress(Exception):
                ray.shutdown()
            _kill_new_children(before)
            if attempt < attempts:
                logger.warning(
                    "Ray's local node did not start (attempt %d of %d: %s); retrying",
                    attempt, attempts, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                continue
            raise RuntimeError(_local_start_failure(exc, attempts)) from exc


def _kill_new_children(before: set[int], grace_s: float = 5.0) -> None:
    """Kill the Ray servers a failed start spawned: this process's children that are not in
    ``before`` and run from Ray's package (GCS, raylet, agents), nothing else of the caller's."""
    ray_dir = str(Path(ray.__file__).parent)
    new = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.pid not in before and any(ray_dir in part for part in proc.cmdline()):
                new.append(proc)
    for proc in new:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(new, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _local_start_failure(exc: BaseException, attempts: int) -> str:
    from ray._common.utils import get_default_ray_temp_dir

    logs = Path(get_default_ray_temp_dir()) / "session_latest" / "logs"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"Ray could not start its local node ({attempts} attempts): {exc}\n"
        f"Ray's logs: {logs} (gcs_server.out, raylet.out). Usual causes: an overloaded "
        f"machine (load average {load:.1f} on {os.cpu_count()} CPUs), too little free memory "
        "or /dev/shm, or Ray processes a killed run left running (a start in the same "
        "trainer.run_dir names them and their kill command). Free the machine and rerun, or "
        "join a running cluster with resources.ray_address=auto."
    )


def _ray_processes(node: Any) -> list[psutil.Process]:
    """The head processes this driver started (GCS, raylet, monitors) and their children
    (the raylet's agents and workers): not the driver's other children."""
    found: dict[int, psutil.Process] = {}
    for infos in getattr(node, "all_processes", {}).values():
        for info in infos:
            with contextlib.suppress(psutil.Error, AttributeError):
                proc = psutil.Process(info.process.pid)
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
    return [found[pid] for pid in sorted(found)]


def _record_session(run_dir: Path) -> None:
    """Write the run directory's session record; remove it at a clean exit (why: see
    ``cluster.leftovers``)."""
    global _record_dir, _atexit_registered
    node = ray._private.worker._global_node
    if node is None:
        return
    try:
        leftovers.write_record(
            run_dir,
            session_dir=str(node.get_session_dir_path()),
            gcs_address=str(node.gcs_address),
            node_ip=str(node.node_ip_address),
            processes=_ray_processes(node),
        )
    except OSError as exc:  # a read-only run dir must not stop training
        logger.warning("could not record the Ray session in %s: %s", run_dir, exc)
        return
    if not _atexit_registered:
        atexit.register(_forget_session)  # a normal exit without shutdown_ray()
        _atexit_registered = True
    _record_dir = run_dir


def _forget_session() -> None:
    global _record_dir
    if _record_dir is not None:
        with contextlib.suppress(OSError):
            leftovers.remove_record(_record_dir)
        _record_dir = None


def ray_initialized() -> bool:
    """Whether this process is connected to Ray (a run that starts it also stops it)."""
    return ray.is_initialized()


def shutdown_ray() -> None:
    """Stop this process's Ray connection (and the local cluster if it started one)."""
    if ray.is_initialized():
        ray.shutdown()
    _forget_session()
