"""The one "write into a temporary sibling, then rename into place" helper.

Why one module: checkpoints, exports, rollout dumps, the metrics file and prepared data all
must never be seen half-written. Renaming within one directory is atomic on POSIX
filesystems, so everything is written next to its final name under a hidden prefix and
renamed when complete; a replaced target is first renamed aside, so no instant exists at
which a gutted directory carries the final name. Leftovers of a killed process keep the
hidden prefixes and are removed by :func:`remove_leftovers`.

At the bottom of the package: it imports nothing from ``fipo_trainer``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "OLD_PREFIX",
    "TMP_PREFIX",
    "atomic_dir",
    "atomic_file",
    "commit_dir",
    "discard_dir",
    "fsync_dir",
    "remove_leftovers",
    "tmp_sibling",
]

TMP_PREFIX = ".tmp-"  # being written
OLD_PREFIX = ".old-"  # being replaced or deleted


def fsync_dir(path: str | Path) -> None:
    """Make renames inside ``path`` durable (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_sibling(final: str | Path) -> Path:
    """The deterministic temp path ``<parent>/.tmp-<name>`` (for writers on several ranks,
    which must agree on it without talking; single writers use :func:`atomic_dir`)."""
    final = Path(final).expanduser().resolve()
    return final.parent / f"{TMP_PREFIX}{final.name}"


def discard_dir(path: str | Path) -> None:
    """Delete a directory by renaming it aside first (a crash mid-delete leaves only a
    hidden ``.old-`` folder, never a gutted directory under its real name)."""
    path = Path(path)
    doomed = path.parent / f"{OLD_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def commit_dir(tmp: str | Path, final: str | Path) -> Path:
    """Rename the finished ``tmp`` to ``final``, replacing an existing ``final``."""
    tmp, final = Path(tmp), Path(final).expanduser()
    old = None
    if final.exists():
        old = final.parent / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh hidden temp directory beside ``final``; on normal exit it becomes
    ``final`` (replacing an older one); if the block raises it is removed and ``final`` is
    untouched."""
    final = Path(final).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(
    path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8"
) -> Iterator[IO]:
    """Open a hidden temp file beside ``path`` for writing; on normal exit it is flushed,
    fsynced and renamed over ``path``; if the block raises it is removed."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    binary = "b" in mode
    try:
        with open(tmp, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_leftovers(directory: str | Path) -> None:
    """Remove temp and half-deleted entries a killed process left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
