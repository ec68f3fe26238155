"""Follow a run's ``metrics.jsonl`` while ``fipo-train`` writes it (the benchmarks' clock).

Why: a run directory that held an earlier run still has its rows when the next launch
starts; read at once, they would pass for this run's first steps (a start-up of -0.5 s was
reported that way). The trainer moves the earlier file to ``earlier_runs/`` (or, resuming,
appends to it), so only what appears after the launch is this run's.
"""

from __future__ import annotations

import os
from pathlib import Path


class MetricsTail:
    """Complete lines written to ``path`` since this object was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        old = path.stat() if path.exists() else None
        # An earlier file is skipped: kept (append), it is read from its end; replaced, the
        # new one is read from its start.
        self._inode, self._offset = (old.st_ino, old.st_size) if old else (None, 0)
        self._pending = ""

    def read(self) -> list[str]:
        """Lines completed since the last call (a partial last line waits for its end)."""
        try:
            f = self.path.open(encoding="utf-8")
        except FileNotFoundError:  # not written yet, or being moved to earlier_runs/
            return []
        with f:
            now = os.fstat(f.fileno())
            if now.st_ino != self._inode or now.st_size < self._offset:
                self._inode, self._offset, self._pending = now.st_ino, 0, ""
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        *complete, self._pending = (self._pending + chunk).split("\n")
        return complete

    def rest(self) -> list[str]:
        """Whatever is left once the writer has exited (a last line without its newline)."""
        lines = [*self.read(), self._pending]
        self._pending = ""
        return lines
