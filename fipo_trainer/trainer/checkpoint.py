"""Trainer checkpoints: atomic ``global_step_N`` directories, a latest pointer, keep-last-N.

Why this shape: a run killed at any instant (pre-emption, OOM, Ctrl-C) must resume from a
checkpoint that is whole. Everything is written into a hidden temp directory that is
renamed to ``global_step_N`` only when complete (rename is atomic on one filesystem); the
``latest_checkpointed_iteration.txt`` pointer (verl's name) is replaced atomically only
after that rename, and older checkpoints are deleted only after both. A directory counts as
a checkpoint only if it carries ``trainer_state.pt``, so stray or half-deleted folders are
never resumed from. Multi-node runs need ``run_dir`` on a filesystem all ranks share.

Each checkpoint carries ``fipo_manifest.json`` (sizes + sha256 of every file, the actor's
nested manifest included), written last inside the temp directory; :meth:`resolve_resume`
verifies it before anything heavy starts and ``auto`` falls back to the newest valid
checkpoint (see :mod:`~fipo_trainer.trainer.checkpoint_manifest`). ``trainer_state.pt``
holds only tensors and plain types and is loaded with ``weights_only=True``.

Layout::

    run_dir/checkpoints/
        global_step_10/         (whatever write_fn wrote, e.g. actor/) + trainer_state.pt
                                + fipo_manifest.json
        global_step_15/
        latest_checkpointed_iteration.txt   -> "15"
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fipo_trainer.fsutil import (
    MANIFEST_FILE,
    atomic_dir,
    atomic_file,
    discard_dir,
    remove_leftovers,
    write_manifest,
)
from fipo_trainer.trainer.checkpoint_manifest import (
    STATE_FILE,
    STATE_FORMAT,
    CheckpointInvalid,
    checkpoint_problems,
    describe,
    first_valid,
    load_state_file,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "POINTER_FILE",
    "STATE_FILE",
    "CheckpointInvalid",
    "CheckpointManager",
    "rng_state",
    "set_rng_state",
    "step_of",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
POINTER_FILE = "latest_checkpointed_iteration.txt"
_PREFIX = "global_step_"
_NAME_RE = re.compile(rf"^{_PREFIX}(\d+)$")


def rng_state() -> dict[str, Any]:
    """The driver's Python/numpy/torch RNG states (saved in ``trainer_state``) as tensors and
    plain types only, so that ``weights_only=True`` loading needs no pickled classes."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states (also the raw tuples/arrays of older checkpoints)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"]), py["gauss_next"])
    random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])


def step_of(path: str | Path) -> int:
    """The N of a ``global_step_N`` directory."""
    match = _NAME_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named global_step_<N>")
    return int(match.group(1))


def _is_complete(path: Path) -> bool:
    return _NAME_RE.match(path.name) is not None and (path / STATE_FILE).is_file()


def _is_candidate(path: Path) -> bool:
    """Looks like a checkpoint (state file or manifest): resumable once verified."""
    return _NAME_RE.match(path.name) is not None and (
        (path / STATE_FILE).is_file() or (path / MANIFEST_FILE).is_file()
    )


def _saved_after_pointer(found: list[Path], named: Path, pointer: Path) -> list[Path]:
    """Steps above the pointer's written after it: saves killed between moving the
    checkpoint into place and writing the pointer (steps above it written before it were
    abandoned by a resume from an older one, and the pointer then rewritten)."""
    written = pointer.stat().st_mtime_ns
    return [p for p in found if step_of(p) > step_of(named) and p.stat().st_mtime_ns > written]


def _candidates_in(root: Path) -> list[Path]:
    """Checkpoints to try, best first: a save newer than the pointer (its pointer write was
    interrupted), the pointer's, then older steps, newest first (other steps above the
    pointer were abandoned by a resume from an older one). Without a usable pointer: every
    step, newest first."""
    if not root.is_dir():
        return []
    found = sorted(
        (p for p in root.iterdir() if p.is_dir() and _is_candidate(p)), key=step_of, reverse=True
    )
    pointer = root / POINTER_FILE
    text = pointer.read_text().strip() if pointer.is_file() else ""
    named = root / f"{_PREFIX}{int(text)}" if text.isdigit() else None
    if named in found:
        newer = _saved_after_pointer(found, named, pointer)
        return newer + [named] + [p for p in found if step_of(p) < step_of(named)]
    if pointer.is_file():
        logger.warning(
            "%s names %r, which is not a checkpoint; trying the newest ones", pointer, text
        )
    return found


def _complete_in(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _is_complete(p)), key=step_of)


def _latest_in(root: Path) -> Path | None:
    pointer = root / POINTER_FILE
    if pointer.is_file():
        text = pointer.read_text().strip()
        if text.isdigit():
            candidate = root / f"{_PREFIX}{int(text)}"
            if _is_complete(candidate):
                newer = _saved_after_pointer(_complete_in(root), candidate, pointer)
                return max(newer, key=step_of) if newer else candidate
        logger.warning(
            "%s names %r, which is not a complete checkpoint; using the newest one", pointer, text
        )
    found = _complete_in(root)
    return found[-1] if found else None


def find_checkpoint(path: Path) -> Path | None:
    """``path`` if it is a complete checkpoint, else the latest in it (a run directory or its
    checkpoints directory): what ``trainer.resume=<path>`` resumes from."""
    if _is_candidate(path):
        return path
    if not path.is_dir():
        return None
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    return next(iter(_candidates_in(root)), None)


class CheckpointManager:
    """Saves, lists, prunes and finds checkpoints under ``run_dir/checkpoints``.

    ``keep_last`` (``trainer.max_ckpt_to_keep``): keep this many newest checkpoints
    (``None``: keep all). Only the driver process should use it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int | None = None,
        actor_layout: tuple[int, int] | None = None,
    ) -> None:
        """``actor_layout``: this run's (``actor.zero_stage``, actor ranks); a checkpoint to
        resume from must have been saved under the same (:meth:`resolve_resume`)."""
        if keep_last is not None and int(keep_last) < 1:
            raise ValueError(
                f"trainer.max_ckpt_to_keep must be >= 1 or null (keep all), got {keep_last}"
            )
        self.run_dir = Path(run_dir).expanduser()
        self.root = self.run_dir / CHECKPOINTS_DIR
        self.keep_last = None if keep_last is None else int(keep_last)
        self.actor_layout = actor_layout

    @classmethod
    def for_run(cls, cfg: Any) -> CheckpointManager:
        """The manager of a training run's config (``trainer.*``, the actor's layout)."""
        layout = (int(cfg.actor.zero_stage), int(cfg.resources.actor_world_size))
        run_dir = Path(cfg.trainer.run_dir).resolve()
        return cls(run_dir, cfg.trainer.max_ckpt_to_keep, actor_layout=layout)

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first."""
        return _complete_in(self.root)

    def latest(self) -> Path | None:
        """The checkpoint the pointer names if it is complete, else the highest complete step.

        The pointer wins over a higher step: after resuming from an older checkpoint by path,
        the newest save is the one the run continued from, not an abandoned later one. A
        higher step written after the pointer wins over it: a save killed before its pointer
        write (:func:`_saved_after_pointer`).
        """
        return _latest_in(self.root)

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        write_fn: Callable[[Path], None],
        trainer_state: Mapping[str, Any],
    ) -> Path:
        """Write checkpoint ``step`` atomically and return ``run_dir/checkpoints/global_step_{step}``.

        ``write_fn(tmp_dir)`` writes the heavy state (actor engine, ...) into a temp directory;
        ``trainer_state`` (step, sampler state, RNG states, config: tensors and plain types
        only, or resuming will refuse it) goes to ``trainer_state.pt``; the manifest is
        written last. If anything raises, the temp directory is removed and the previous
        checkpoints and pointer are untouched.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        state = {**dict(trainer_state), "format": STATE_FORMAT}
        if state.setdefault("step", step) != step:
            raise ValueError(
                f"trainer_state['step']={state['step']} but save() was called for step {step}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.root)

        final = self.root / f"{_PREFIX}{step}"
        with atomic_dir(final) as tmp:  # re-saving a step (after a resume) swaps it out
            write_fn(tmp)
            with atomic_file(tmp / STATE_FILE, "wb") as f:
                torch.save(state, f)
            write_manifest(tmp)  # last: its presence means everything else is in place
        self._write_pointer(step)
        self._prune(keep=final)
        logger.info("saved checkpoint %s", final)
        return final

    def _write_pointer(self, step: int) -> None:
        with atomic_file(self.root / POINTER_FILE) as f:
            f.write(f"{step}\n")

    def _prune(self, keep: Path) -> None:
        """Keep the last ``keep_last`` of this run's line: the steps before ``keep``. Later
        steps (a run resumed from an older checkpoint left them) are neither counted nor
        removed: pruning them kept this run's fallbacks off the disk and old ones on it."""
        if self.keep_last is None:
            return
        others = [p for p in self.checkpoints() if step_of(p) < step_of(keep)]
        excess = len(others) + 1 - self.keep_last
        for path in others[: max(excess, 0)]:
            discard_dir(path)
            logger.info(
                "removed old checkpoint %s (trainer.max_ckpt_to_keep=%d)", path, self.keep_last
            )

    # ------------------------------------------------------------------ resuming
    def clean_leftovers(self) -> list[Path]:
        """Remove the temp and half-deleted directories a crash mid-save left (at start-up)."""
        removed = remove_leftovers(self.root)
        for path in removed:
            logger.info(
                "removed leftover temporary checkpoint entry %s (a save or delete "
                "interrupted by a crash)",
                path,
            )
        return removed

    def resolve_resume(self, mode: str | None) -> Path | None:
        """The verified checkpoint to resume from for ``trainer.resume`` (call it before
        anything heavy starts: it reads every file of the checkpoint once).

        ``"disable"`` (or ``None``): none. ``"auto"``: the pointer's checkpoint, or when its
        manifest does not match the newest older valid one (a warning names the broken
        files); none when there is no checkpoint at all; :class:`CheckpointInvalid` when
        there are some but none is valid. Anything else is a path: a ``global_step_N``
        directory, or a run/checkpoints directory whose latest is used; it must exist and be
        valid (no fallback: an explicit choice that is broken is an error).
        """
        if mode is None or str(mode).strip().lower() == "disable":
            return None
        text = str(mode).strip()
        if text.lower() == "auto":
            candidates = _candidates_in(self.root)
            found, broken = first_valid(candidates)
            if found is not None:
                logger.info("trainer.resume=auto: resuming from %s", found)
                return self._fits_actor(found, text)
            if broken:
                raise CheckpointInvalid(
                    f"trainer.resume=auto: no valid checkpoint in {self.root}:\n{describe(broken)}"
                    "\nPass trainer.resume=<path to a checkpoints/global_step_N directory> to "
                    "pick one, or trainer.resume=disable to start afresh"
                )
            return None
        if not text:
            raise CheckpointInvalid("trainer.resume is empty; use auto, disable or a checkpoint path")
        path = Path(text).expanduser()
        if not path.exists():
            raise CheckpointInvalid(
                f"trainer.resume={text!r}: {path} does not exist; set trainer.resume to auto, "
                "disable or an existing checkpoints/global_step_N directory"
            )
        found = find_checkpoint(path)
        if found is None:
            raise CheckpointInvalid(
                f"trainer.resume={text!r}: {path} is not a complete checkpoint (a global_step_N "
                f"directory with {STATE_FILE}) and holds none; point trainer.resume at one, or "
                "use auto"
            )
        problems = checkpoint_problems(found)
        if problems:
            raise CheckpointInvalid(
                f"trainer.resume={text!r}: checkpoint {found} is broken: {'; '.join(problems)}. "
                "Point trainer.resume at another checkpoints/global_step_N directory, or use "
                "trainer.resume=disable to start afresh"
            )
        return self._fits_actor(found.resolve(), text)

    def _fits_actor(self, path: Path, mode: str) -> Path:
        """``path``, if its actor was saved under this run's ZeRO stage and rank count: ZeRO
        partitions a checkpoint by both, so DeepSpeed could not load it under others (and
        would say so only once every role had started)."""
        from fipo_trainer.actor.checkpoint import MARKER, read_marker

        if self.actor_layout is None or not (path / "actor" / MARKER).is_file():
            return path  # an older release's checkpoint: left to DeepSpeed, as before
        info = read_marker(path / "actor")
        saved = (info.get("zero_stage"), info.get("world_size"))
        if saved != self.actor_layout:
            raise CheckpointInvalid(
                f"trainer.resume={mode}: checkpoint {path} was saved by actor.zero_stage="
                f"{saved[0]} on {saved[1]} actor ranks; this run has actor.zero_stage="
                f"{self.actor_layout[0]} on {self.actor_layout[1]} "
                "(resources.actor_world_size). Resume with the same two, or set trainer.run_dir "
                "to a new directory to start afresh"
            )
        return path

    def load_trainer_state(self, path: str | Path) -> dict[str, Any]:
        """``trainer_state`` as saved (``path``: the checkpoint directory or its state file).

        Loaded with ``weights_only=True`` (:func:`load_state_file`): only tensors and plain
        types, so a crafted file cannot run code here. The DeepSpeed shards beside it are
        unpickled by DeepSpeed and trusted only after :meth:`resolve_resume` verified them.
        """
        path = Path(path).expanduser()
        file = path / STATE_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: {path} is not a checkpoint written by CheckpointManager"
            )
        return load_state_file(file)
