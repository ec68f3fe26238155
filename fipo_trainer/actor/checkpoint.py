"""Atomic directory writes for checkpoints and exports.

Why: a crash (or pre-emption) in the middle of a save must never leave a directory that
looks complete. Every rank writes into a hidden temp sibling of the target
(``fsutil.tmp_sibling``), and rank 0 renames it into place only after all ranks are done (a
shared filesystem is assumed on multi-node clusters, as DeepSpeed itself assumes).

Integrity: rank 0 writes a manifest (``fsutil.write_manifest``: sizes + sha256) last, after
every rank's shards and the marker are in place. DeepSpeed's own loader calls
``torch.load`` on its shards with pickles enabled (it cannot load them with
``weights_only=True``), so the trainer verifies this manifest, nested in the step
checkpoint's, before anything starts, and :func:`read_marker` (called by every rank before
DeepSpeed loads) checks presence and sizes again. A checkpoint is thus trusted only as far as
it is this run's own, unaltered files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from fipo_trainer.fsutil import (
    ManifestMissing,
    commit_dir,
    tmp_sibling,
    verify_manifest,
    write_manifest,
)

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
    """Write the marker, then the manifest over everything (rank 0, after all ranks saved):
    the manifest must come last so that its presence means the directory was whole."""
    (directory / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))
    write_manifest(directory)


def read_marker(directory: str | Path) -> dict[str, Any]:
    """The marker, after a presence-and-size check of the manifest (before DeepSpeed's
    pickle-loading ``torch.load`` runs; checksums were verified by the driver). A directory
    without a manifest was written by an older release and is accepted as before."""
    path = Path(directory) / MARKER
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an actor checkpoint (no {MARKER}); pass a directory written "
            "by save_checkpoint"
        )
    with contextlib.suppress(ManifestMissing):
        verify_manifest(directory, checksums=False)
    return json.loads(path.read_text())
