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
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "MANIFEST_FILE",
    "OLD_PREFIX",
    "TMP_PREFIX",
    "ManifestError",
    "ManifestMissing",
    "atomic_dir",
    "atomic_file",
    "commit_dir",
    "discard_dir",
    "fsync_dir",
    "remove_leftovers",
    "tmp_sibling",
    "verify_manifest",
    "write_manifest",
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


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Remove temp and half-deleted entries a killed process left in ``directory``; return
    them (callers log what a crash left behind)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        if p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------- manifests
# Why: an atomic rename guarantees a directory was whole when committed, not that its bytes
# are still intact (a full disk under a non-POSIX filesystem, a bad copy, a truncated rsync).
# A manifest lists every file's size and SHA-256; it is written last, so its presence also
# says "everything else was in place". SHA-256 rather than a cheaper CRC: with SHA-NI it
# hashes ~1.5 GB/s per core (zlib.crc32 ~2.7 GB/s), so reading multi-GB shards from disk,
# not hashing, dominates; and it is the checksum users can re-check with ``sha256sum``.
# A subdirectory with its own manifest (the DeepSpeed actor directory) is covered by that
# manifest's checksum and verified recursively, so its shards are hashed once per save.

MANIFEST_FILE = "fipo_manifest.json"
_MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A directory's files do not match its manifest; ``problems`` names each broken file."""

    def __init__(self, directory: Path, problems: list[str]) -> None:
        self.directory, self.problems = directory, problems
        super().__init__(f"{directory}: " + "; ".join(problems))


class ManifestMissing(ManifestError):
    """The directory carries no manifest (written before manifests existed, or it was lost)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_entries(directory: Path) -> list[Path]:
    """Files the manifest of ``directory`` covers: everything except its own manifest, with
    a sub-manifest standing in for the files of its subdirectory."""
    out: list[Path] = []
    for p in sorted(directory.iterdir()):
        if p.is_dir():
            out.extend(
                [p / MANIFEST_FILE] if (p / MANIFEST_FILE).is_file() else _manifest_entries(p)
            )
        elif p.is_file() and p != directory / MANIFEST_FILE:
            out.append(p)
    return out


def write_manifest(directory: str | Path) -> Path:
    """Write ``directory/fipo_manifest.json`` (relative path, size, sha256 of every file)
    atomically. Call it LAST, when every other file of the directory is in place."""
    directory = Path(directory)
    files = {}
    for p in _manifest_entries(directory):
        files[p.relative_to(directory).as_posix()] = {
            "size": p.stat().st_size,
            "sha256": _sha256(p),
        }
    path = directory / MANIFEST_FILE
    with atomic_file(path) as f:
        json.dump({"format": _MANIFEST_FORMAT, "files": files}, f, indent=1, sort_keys=True)
    return path


def verify_manifest(directory: str | Path, *, checksums: bool = True) -> int:
    """Check every file the manifest of ``directory`` lists (and nested manifests); return
    the number of files checked. ``checksums=False`` checks presence and sizes only (for a
    second look at a directory whose checksums were verified moments before).

    Raises :class:`ManifestMissing` without a manifest and :class:`ManifestError` naming
    every missing, resized or altered file (paths relative to ``directory``).
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ManifestMissing(directory, [f"{MANIFEST_FILE} is missing"])
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        files = f"{type(err).__name__}: {err}"
    if not isinstance(files, dict):
        raise ManifestError(directory, [f"{MANIFEST_FILE} is unreadable ({files})"])
    problems: list[str] = []
    checked = 0
    for rel, entry in sorted(files.items()):
        file = directory / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = file.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{rel} has {size} bytes, the manifest says {entry.get('size')}")
            continue
        if checksums and _sha256(file) != entry.get("sha256"):
            problems.append(f"{rel} has a different sha256 than the manifest")
            continue
        checked += 1
        if file.name == MANIFEST_FILE:  # a nested manifest: verify what it lists
            sub = file.parent
            try:
                checked += verify_manifest(sub, checksums=checksums)
            except ManifestError as err:
                prefix = sub.relative_to(directory).as_posix()
                problems.extend(f"{prefix}/{p}" for p in err.problems)
    if problems:
        raise ManifestError(directory, problems)
    return checked


class RunDirUnusable(RuntimeError):
    """The run directory cannot be trained in: it cannot be created or written, or another
    run holds it."""


class RunDirInUse(RunDirUnusable):
    """Another live process trains in this run directory."""


LOCK_NAME = ".fipo-train.lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process while it trains.

    Why: two runs in one directory (a command run again in a second terminal, the default
    ``trainer.run_dir`` twice) append to one ``metrics.jsonl`` and overwrite each other's
    checkpoints. The lock is the kernel's (``flock``), so a run that dies, even by SIGKILL,
    frees it; the file keeps the holder's pid for the message.
    """
    import fcntl

    path = Path(run_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_NAME, "a+")  # noqa: SIM115 - closed by the `with` below
    except OSError as err:
        raise RunDirUnusable(
            f"trainer.run_dir={str(path)!r} cannot be created or written "
            f"({type(err).__name__}: {err.strerror or err}): set trainer.run_dir to a "
            "directory this user can write"
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunDirInUse(
                f"trainer.run_dir={str(path)!r} is in use by another fipo-train (pid {holder}): "
                "wait for it to end, stop it, or set trainer.run_dir to another directory"
            ) from None
        except OSError as err:  # a file system without locks (some NFS mounts): run unguarded
            logging.getLogger(__name__).warning("cannot lock %s (%s): not guarded", path, err)
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
