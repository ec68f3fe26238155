"""Is a checkpoint safe to resume from? Manifest verification, safe state loading, fallback.

Why its own module: resuming from a damaged checkpoint used to fail only after Ray,
DeepSpeed and vLLM had started (a truncated ``trainer_state.pt`` gave ``OSError: [Errno 22]
Invalid argument`` after ~100 s). The driver now checks the manifest (``fsutil``: sizes and
sha256 of every file, the DeepSpeed actor directory's nested manifest included) before
anything heavy starts, and ``trainer.resume=auto`` falls back to the newest valid checkpoint.

Loading executes no pickled code: ``trainer_state.pt`` holds only tensors and plain types
(the RNG states and sampler state are stored that way) and is read with
``torch.load(weights_only=True)``. DeepSpeed's own loader unpickles its shards; they are
trusted only after their manifest matched.

Checkpoints of the release before manifests carry none. They were committed by an atomic
rename, so they are accepted with a warning (their files cannot be verified) and their
numpy RNG arrays are loaded with only numpy's array reconstruction allowed. A checkpoint
whose ``trainer_state`` carries ``format`` (this release) but no manifest is broken.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fipo_trainer.fsutil import MANIFEST_FILE, ManifestError, ManifestMissing, verify_manifest

__all__ = [
    "STATE_FILE",
    "STATE_FORMAT",
    "CheckpointInvalid",
    "checkpoint_problems",
    "describe",
    "first_valid",
    "load_state_file",
]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
STATE_FORMAT = 2  # trainer_state["format"]; the release before manifests wrote no such key


class CheckpointInvalid(ValueError):
    """No checkpoint to resume from; the message names the broken files and what to do."""


def _legacy_numpy_globals() -> list[Any]:
    """What a pre-manifest state needs besides plain types: numpy arrays (the RNG key) and
    numpy scalars, under numpy 1's and numpy 2's module names. No callable runs code."""
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct
    scalar = np._core.multiarray.scalar
    return [
        np.ndarray,
        np.dtype,
        *(type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"),  # numeric dtypes only
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]


def load_state_file(file: str | Path) -> dict[str, Any]:
    """``torch.load(file, weights_only=True)``: tensors and plain types only, never pickled
    code. Raises :class:`CheckpointInvalid` naming ``file`` if it is unreadable or refused."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # a pre-manifest state (numpy RNG arrays): retry allowing numpy arrays only
            with torch.serialization.safe_globals(_legacy_numpy_globals()):
                state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = next((x for x in lines if x.startswith(("Unsupported", "Can only"))), lines[:1])
        raise CheckpointInvalid(
            f"{file} holds objects that weights_only loading refuses (only tensors and plain "
            f"types are accepted; the file was not written by this trainer or was altered): {why}"
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointInvalid(f"{file} cannot be loaded ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointInvalid(f"{file} does not hold a trainer state dict with a 'step'")
    return state


def checkpoint_problems(path: Path) -> list[str]:
    """``[]`` when ``path`` may be resumed from, else what is broken (file names relative to
    ``path``). Reads every listed file once (sha256); logs what it verified."""
    try:
        checked = verify_manifest(path)
    except ManifestMissing:
        pass
    except ManifestError as err:
        return err.problems
    else:
        logger.info("checkpoint %s: %d files match its %s", path, checked, MANIFEST_FILE)
        return []
    try:  # no manifest: a pre-manifest checkpoint, or this release's with the manifest lost
        state = load_state_file(path / STATE_FILE)
    except (FileNotFoundError, CheckpointInvalid) as err:
        return [f"{MANIFEST_FILE} is missing and {STATE_FILE} cannot be loaded ({err})"]
    if "format" in state:
        return [f"{MANIFEST_FILE} is missing (this release wrote one: it was deleted or lost)"]
    logger.warning(
        "checkpoint %s has no %s: it was written by a release before checkpoint manifests, "
        "so its files cannot be verified; resuming from it anyway (that release committed "
        "checkpoints atomically). Its next save will carry a manifest.",
        path,
        MANIFEST_FILE,
    )
    return []


def first_valid(candidates: Iterable[Path]) -> tuple[Path | None, dict[Path, list[str]]]:
    """The first candidate without problems, and the problems of those skipped before it
    (each skip is logged as a warning naming the broken files)."""
    broken: dict[Path, list[str]] = {}
    for path in candidates:
        problems = checkpoint_problems(path)
        if not problems:
            return path, broken
        broken[path] = problems
        logger.warning(
            "checkpoint %s is broken, not resuming from it: %s", path, "; ".join(problems)
        )
    return None, broken


def describe(broken: dict[Path, list[str]]) -> str:
    """``global_step_N: problem; problem`` lines for an error message."""
    return "\n".join(f"  {p}: {'; '.join(problems)}" for p, problems in broken.items())
