"""A private multi-node Ray cluster on this machine, started with scripts/ray_cluster.sh.

Every node runs with its own explicit free ports, on 127.0.0.1, under one private temp dir,
so it never meets another Ray on the machine. ``stop()`` kills only the processes of its
own nodes (found by that temp dir in their command lines) by pid: never ``ray stop``, which
stops every Ray process of the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fipo_trainer.cluster.worker import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "ray_cluster.sh"


def _venv_bin() -> Path:
    import sys

    return Path(sys.executable).parent


def free_ports(n: int, avoid: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now, none of them in ``avoid``.

    A port handed out earlier but not yet bound (a worker port, the dashboard's) looks free
    to the kernel and can come back: CI once gave the dashboard's port to a worker, and
    ``ray start`` refused the clash. ``avoid`` holds what the cluster already assigned. The
    ports come from ``free_port``, outside the range outgoing connections take theirs from.
    """
    ports: list[int] = []
    while len(ports) < n:
        port = free_port("127.0.0.1")
        if port not in avoid and port not in ports:
            ports.append(port)
    return ports


@dataclass
class RayNodes:
    """Head + workers, each with ``num_cpus`` CPUs and its own custom resource."""

    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp")))
    gcs_port: int = 0
    dashboard_port: int = 0
    log: list[str] = field(default_factory=list)
    assigned: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.gcs_port, self.dashboard_port = self._ports(2)

    def _ports(self, n: int) -> list[int]:
        """``n`` free ports no node of this cluster was given before (a failed one included)."""
        ports = free_ports(n, avoid=self.assigned)
        self.assigned.update(ports)
        return ports

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def env(self) -> dict[str, str]:
        """The environment of anything that talks to this cluster (script, driver, CLI)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        path = f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}"
        return {
            **env,
            "PATH": path,
            "RAY_ADDRESS": self.address,
            "RAY_PORT": str(self.gcs_port),
            "DASHBOARD_PORT": str(self.dashboard_port),
            "DASHBOARD_HOST": "127.0.0.1",
            "RAY_BIN": str(_venv_bin() / "ray"),
            "FIPO_TRAIN": str(_venv_bin() / "fipo-train"),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def _node_args(self, resources: dict[str, float], num_cpus: int) -> list[str]:
        nm, om, agent, agent_grpc, rt_env, metrics, *workers = self._ports(6 + 16)
        return [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_env}",
            f"--metrics-export-port={metrics}",
            f"--worker-port-list={','.join(map(str, workers))}",
            f"--temp-dir={self.temp_dir}",
            "--object-store-memory=200000000",
        ]

    def _script(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        res = subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.log.append(f"$ ray_cluster.sh {' '.join(args)}\n{res.stdout}\n{res.stderr}")
        if res.returncode != 0:
            self.log[-1] += self.diagnosis()
            raise RuntimeError(f"ray_cluster.sh {args[0]} failed:\n{self.log[-1]}")
        return res

    def _start_node(self, build_args: Callable[[int], list[str]], attempts: int) -> None:
        """Start one node; a start that fails is killed and retried on fresh ports.

        ``ray start`` gives the raylet a fixed 30 s to register with the GCS, which a loaded
        2-core machine can miss once (CI saw "The current node timed out during startup").
        Every failure stays in ``log``; the last one is raised with the diagnosis.
        """
        for attempt in range(1, attempts + 1):
            before = {p.pid for p in self.processes()}
            try:
                self._script(*build_args(attempt))
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill([p for p in self.processes() if p.pid not in before])
                if attempt == attempts:
                    raise

    def start_head(self, resources: dict[str, float], num_cpus: int = 1, attempts: int = 2) -> None:
        def head_args(attempt: int) -> list[str]:
            if attempt > 1:  # the failed head's ports may still be held
                self.gcs_port, self.dashboard_port = self._ports(2)
            client = self._ports(1)[0]
            return [
                "head",
                *self._node_args(resources, num_cpus),
                f"--ray-client-server-port={client}",
            ]

        self._start_node(head_args, attempts)

    def add_worker(self, resources: dict[str, float], num_cpus: int = 1, attempts: int = 2) -> None:
        self._start_node(
            lambda _attempt: ["worker", self.address, *self._node_args(resources, num_cpus)],
            attempts,
        )

    def diagnosis(self, lines: int = 15) -> str:
        """The machine's load, its busiest processes and the tails of this cluster's core logs."""
        busy = sorted(
            psutil.process_iter(["pid", "name", "cpu_times"]),
            key=lambda p: sum((p.info["cpu_times"] or (0, 0))[:2]),
            reverse=True,
        )[:5]
        out = [
            f"load average {os.getloadavg()}",
            "busiest processes (CPU-s): "
            + ", ".join(
                f"{p.info['name']}[{p.info['pid']}] {sum((p.info['cpu_times'] or (0, 0))[:2]):.0f}"
                for p in busy
            ),
        ]
        for log in sorted(self.temp_dir.glob("session_2*/logs/*")):
            if log.name in ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err"):
                with contextlib.suppress(OSError):
                    tail = log.read_text(errors="replace").splitlines()[-lines:]
                    out.append(f"--- {log.relative_to(self.temp_dir)}\n" + "\n".join(tail))
        return "\n".join(out)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those naming its temp dir, and their children."""
        key = str(self.temp_dir)
        me = os.getuid()
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline", "uids"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if proc.info["uids"].real != me:
                    continue
                if any(key in part for part in proc.info["cmdline"] or ()):
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found.setdefault(child.pid, child)
        found.pop(os.getpid(), None)
        return list(found.values())

    @staticmethod
    def _kill(procs: list[psutil.Process], grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL what is left after ``grace_s``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
            _, procs = psutil.wait_procs(procs, timeout=grace_s)
            if not procs:
                return

    def stop(self, grace_s: float = 10.0) -> None:
        """Kill this cluster's processes by pid (SIGTERM, then SIGKILL); remove its dir."""
        for _ in range(3):  # raylets may spawn workers while going down
            procs = self.processes()
            if not procs:
                break
            self._kill(procs, grace_s)
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
