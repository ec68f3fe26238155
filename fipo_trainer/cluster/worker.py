"""Base class of every Ray worker process: rank/world/master info and a health probe.

Why the rank comes from the environment and not from ``__init__`` arguments: the
``WorkerGroup`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``/``LOCAL_RANK``
per actor (the names torch.distributed and DeepSpeed read), so worker classes take only
their own config and code that reads the standard variables just works.

Why the servers here bind through :func:`listen_socket`: torch's ``TCPStore`` server
ignores its host argument and listens on every interface (``::``); handing it a socket
already bound to :func:`bind_host` (127.0.0.1 in a local run, the node IP on a cluster) keeps
the rendezvous store off other networks.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fipo_trainer.startup import settle_gc

T = TypeVar("T")

ENV_GROUP_NAME = "FIPO_WORKER_GROUP"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in its worker group."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = 0
    group_name: str = ""

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read the variables set by ``WorkerGroup`` (defaults: a single process)."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(os.environ.get("MASTER_PORT", 0) or 0),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            group_name=os.environ.get(ENV_GROUP_NAME, ""),
        )

    def env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "LOCAL_RANK": str(self.local_rank),
            ENV_GROUP_NAME: self.group_name,
        }

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


def node_ip() -> str:
    """This node's IP as Ray sees it (falls back to the hostname's address, then loopback)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # Ray missing or not in a Ray process: use the socket answer
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


#: Ports below this are Ray's worker ports (``min_worker_port`` 10002 .. ``max_worker_port``
#: 19999 by default) and well-known services.
PROBED_PORTS_FROM = 20000
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_ports(path: str = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux default)."""
    try:
        low, high = (int(v) for v in Path(path).read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "", *, tries: int = 64, rng: random.Random | None = None) -> int:
    """A TCP port free right now on this node (on ``host``'s address if given), for a
    server another process binds a few seconds later (a rendezvous store).

    Why not the kernel's pick (bind to port 0): it comes from the ephemeral range, the range
    every outgoing connection takes its local port from, and Ray's workers open many in those
    seconds; one that takes the port makes the store's bind fail (``Address already in
    use``). So the port is drawn between Ray's worker ports and the ephemeral range, where
    only an explicit bind can take it; the kernel's pick is the fallback.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = ephemeral_ports()[0]
    draw = rng or random.SystemRandom()
    for _ in range(tries if low - PROBED_PORTS_FROM >= 1000 else 0):
        port = draw.randrange(PROBED_PORTS_FROM, low)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, ``localhost`` and IPv4-mapped loopback (``::ffff:127.0.0.1``)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (``lo`` on Linux)."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.address == "127.0.0.1" for a in addrs):
                return name
    except Exception:  # psutil missing or unreadable interfaces: the Linux name
        pass
    return "lo"


def bind_host(host: str | None = None) -> str:
    """The one address a server of this process listens on: ``host``, else this node's IP.

    The node IP is 127.0.0.1 in a local run (``init_ray`` starts Ray on loopback) and the
    address Ray uses between nodes on a cluster. A wildcard would expose the server on every
    network of the machine, so it is refused.
    """
    chosen = node_ip() if host is None else host
    if chosen in WILDCARD_HOSTS:
        raise ValueError(
            f"refusing to listen on {chosen or '<any>'!r} (every interface): pass this node's IP "
            "(the cluster address) or 127.0.0.1 for a single-machine run"
        )
    return chosen


def listen_socket(host: str, port: int = 0, backlog: int = 128) -> socket.socket:
    """A listening TCP socket bound to ``host`` only (``port=0``: a free port)."""
    host = bind_host(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's own bind does
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def tcp_store(
    host: str,
    port: int,
    world_size: int,
    *,
    is_master: bool,
    timeout: datetime.timedelta,
) -> Any:
    """A torch ``TCPStore``; the master's server listens on ``host`` only (see module doc)."""
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    # A group of one needs no agreed port: any free one cannot be taken in the meantime.
    sock = listen_socket(host, port if world_size > 1 else 0)
    bound_port = int(sock.getsockname()[1])
    fd = sock.detach()  # the store's event loop owns (and closes) the descriptor from here
    try:
        return dist.TCPStore(
            host,
            bound_port,
            world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=fd,
        )
    except Exception:
        os.close(fd)
        raise


def init_torch_distributed(info: DistInfo, backend: str, timeout_s: float = 600.0) -> None:
    """Join the group's default torch.distributed process group (gloo on CPU, NCCL on CUDA).

    Rank 0 serves the rendezvous store on ``MASTER_ADDR`` only (not on every interface, as
    ``init_method="tcp://..."`` would).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend == "gloo" and is_loopback(info.master_addr):
        # Every rank is on this machine; gloo's default device would listen on the
        # hostname's address (often the LAN one).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    timeout = datetime.timedelta(seconds=timeout_s)
    store = tcp_store(
        info.master_addr,
        info.master_port,
        info.world_size,
        is_master=info.rank == 0,
        timeout=timeout,
    )
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
    )


class Worker:
    """Subclass this for any class run by a ``WorkerGroup``."""

    def __init__(self) -> None:
        self.dist_info = DistInfo.from_env()

    @property
    def rank(self) -> int:
        return self.dist_info.rank

    @property
    def world_size(self) -> int:
        return self.dist_info.world_size

    def health(self) -> dict[str, Any]:
        """Cheap probe used by the start-up check (it also proves ``__init__`` finished, so
        the start-up heap is frozen and the GC back on here: ``fipo_trainer.startup``)."""
        settle_gc()
        return {
            "group": self.dist_info.group_name,
            "rank": self.rank,
            "world_size": self.world_size,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_ip": node_ip(),
        }

    def pin_cpus(self, cpus: list[int]) -> list[int]:
        """Confine this worker's threads to ``cpus`` (``cluster.cpu_split``); the result."""
        from fipo_trainer.cluster.cpu_split import pin_this_process

        return pin_this_process(cpus)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(self, *args, **kwargs)`` in this worker (for code that needs its state)."""
        return fn(self, *args, **kwargs)
