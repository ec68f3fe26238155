"""Atomic directory writes for checkpoints and exports.

Why: a crash (or pre-emption) in the middle of a save must never leave a directory that
looks complete. Every rank writes into a hidden temp sibling of the target
(``fsutil.tmp_sibling``), and rank 0 renames it into place only after all ranks are done (a
shared filesystem is assumed on multi-node clusters, as DeepSpeed itself assumes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fipo_trainer.fsutil import commit_dir, tmp_sibling

MARKER = "fipo_actor_checkpoint.json"
DS_TAG = "deepspeed"


def tmp_dir_for(final: str | Path) -> Path:
    """The temp directory every rank writes into (all ranks agree on it without talking)."""
    return tmp_sibling(final)


def prepare_tmp(final: str | Path) -> Path:
    """Create an empty temp dir next to ``final`` (rank 0 only)."""
    tmp = tmp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: str | Path) -> Path:
    """Move ``tmp`` to ``final``, replacing an older ``final`` (rank 0 only)."""
    return commit_dir(tmp, Path(final).expanduser().resolve())


def write_marker(directory: Path, info: dict[str, Any]) -> None:
    (directory / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))


def read_marker(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MARKER
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an actor checkpoint (no {MARKER}); pass a directory written "
            "by save_checkpoint"
        )
    return json.loads(path.read_text())
