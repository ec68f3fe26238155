"""DeepSpeed's CPU shared-memory comm op, built at set-up rather than in a run's start-up.

Why: on a CPU node every DeepSpeed rank loads ``deepspeed_shm_comm``, which torch's JIT
compiles on first use: 29-87 s on 2 cores. In a fresh checkout that compile landed in the
first run's start-up, silently: the quickstart's ranks were ready 45 s after Ray, against
≈ 10 s once built (2026-12-07, docs/benchmarks.md). ``scripts/setup.sh`` runs this module
once, so the build goes to the directory the run's workers will use
(``platform.torch_extensions_dir``: keyed by the build's inputs) and the first run compiles
nothing. A run that would still compile says so first (``pending_build_message``).

    python -m fipo_trainer.cpu_ops     # build if missing; prints where (CPU only)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from fipo_trainer.platform import EXTENSIONS_DIR_ENV, current_platform, torch_extensions_dir

SHM_COMM_OP = "deepspeed_shm_comm"


def built_op(extensions_dir: str | os.PathLike[str], name: str = SHM_COMM_OP) -> Path | None:
    """The op's shared library under ``extensions_dir`` (torch builds it in ``<dir>/<name>``)."""
    found = sorted((Path(extensions_dir) / name).glob(f"{name}*.so"))
    return found[0] if found else None


def pending_build_message(environ: Mapping[str, str] | None = None) -> str | None:
    """What a CPU run's DeepSpeed ranks will compile before they are ready; None if nothing."""
    if current_platform().is_cuda:
        return None
    where = torch_extensions_dir(environ)
    if built_op(where) is not None:
        return None
    return (
        f"DeepSpeed's {SHM_COMM_OP} op is not built for this install yet: the actor ranks "
        f"compile it first (once, ≈ 30-90 s on 2 cores) into {where}. "
        "`python -m fipo_trainer.cpu_ops` (run by scripts/setup.sh) builds it ahead"
    )


def build_shm_comm_op(environ: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """Build the op where the workers look for it; returns (library, built now). CPU only."""
    if current_platform().is_cuda:
        raise RuntimeError(f"{SHM_COMM_OP} is DeepSpeed's CPU comm op; a CUDA node never loads it")
    where = torch_extensions_dir(environ)
    if (library := built_op(where)) is not None:
        return library, False
    os.environ[EXTENSIONS_DIR_ENV] = where  # torch's cpp_extension builds under it
    os.environ.setdefault("DS_ACCELERATOR", current_platform().deepspeed_accelerator)
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
    if (library := built_op(where)) is None:
        raise RuntimeError(f"DeepSpeed built {SHM_COMM_OP} but no library is in {where}")
    return library, True


def main() -> int:
    if current_platform().is_cuda:
        print(f"[setup] CUDA node: DeepSpeed's {SHM_COMM_OP} (a CPU op) is not needed")
        return 0
    where = torch_extensions_dir()
    if built_op(where) is None:
        print(f"[setup] building DeepSpeed's {SHM_COMM_OP} op once (≈ 30-90 s on 2 cores)")
    start = time.perf_counter()
    library, built = build_shm_comm_op()
    done = f"built in {time.perf_counter() - start:.0f} s" if built else "already built"
    print(f"[setup] {SHM_COMM_OP}: {done}: {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
