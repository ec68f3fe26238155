"""Base class of every Ray worker process: rank/world/master info and a health probe.

Why the rank comes from the environment and not from ``__init__`` arguments: the
``WorkerGroup`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``/``LOCAL_RANK``
per actor (the names torch.distributed and DeepSpeed read), so worker classes take only
their own config and code that reads the standard variables just works.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

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


def free_port() -> int:
    """A TCP port that is free right now on this node."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_torch_distributed(info: DistInfo, backend: str, timeout_s: float = 600.0) -> None:
    """Join the group's default torch.distributed process group (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    dist.init_process_group(
        backend=backend,
        init_method=info.init_method,
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
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
        """Cheap probe used by the start-up check (it also proves ``__init__`` finished)."""
        return {
            "group": self.dist_info.group_name,
            "rank": self.rank,
            "world_size": self.world_size,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_ip": node_ip(),
        }

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(self, *args, **kwargs)`` in this worker (for code that needs its state)."""
        return fn(self, *args, **kwargs)
