"""Data helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

#: The real benchmark files (AIME 2024/2025, MATH-500, DAPO-Math-17k) beside the repository.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
