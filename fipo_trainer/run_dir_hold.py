"""``fipo-train``'s hold on a run directory: `fipo_trainer.fsutil.run_dir_lock`, re-entrant
within the process.

Why: ``train_main`` locks a single run's directory before Hydra writes ``.hydra/`` into it (a
refused second run used to overwrite the first one's), and the Hydra task then holds the
directory it trains in: the same one, except in a sweep job or when only Hydra can resolve
``trainer.run_dir``. The lock is an ``flock`` on a fresh file handle, so taking it a second
time in one process is refused as "in use"; a hold takes it once per directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["hold_run_dir"]

_HELD: set[Path] = set()  # the directories this process holds


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path | None) -> Iterator[None]:
    """Lock ``run_dir`` for the block unless this process already holds it (None: no lock).
    Raises `fipo_trainer.fsutil.RunDirUnusable` when it cannot be created or is in use."""
    path = None if run_dir is None else Path(str(run_dir)).expanduser().resolve()
    if path is None or path in _HELD:
        yield
        return
    from fipo_trainer.fsutil import run_dir_lock

    with run_dir_lock(path):
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
