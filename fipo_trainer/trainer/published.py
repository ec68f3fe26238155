"""The FIPO paper's published AIME results (FIPO_SPEC.md §4), as data.

Why here: ``fipo-eval`` prints them beside an evaluated model so a reproduction can be
compared at a glance; the numbers live in one place only. Percentages, as published.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PAPER_SAMPLING", "PUBLISHED", "Published", "benchmark_of"]

#: How the paper sampled: 32 responses per problem at T 1.0, top_p 0.7, up to 20480 tokens
#: (the 32B recipe's validation settings, FIPO_SPEC.md §2).
PAPER_SAMPLING = {"k": 32, "temperature": 1.0, "top_p": 0.7, "max_tokens": 20480}


@dataclass(frozen=True)
class Published:
    """One published row: avg@32 / cons@32 / pass@32 in percent (None: not published)."""

    method: str
    model: str
    benchmark: str  # "aime24" | "aime25"
    avg: float
    cons: float | None = None
    pass_: float | None = None
    note: str = ""


PUBLISHED: tuple[Published, ...] = (
    Published("DAPO", "Qwen2.5-32B base", "aime24", 50, 60, 80),
    Published("FIPO", "Qwen2.5-32B base", "aime24", 56, 73, 83, "peak avg@32 58"),
    Published("DAPO", "Qwen2.5-32B base", "aime25", 38, 47, 63),
    Published("FIPO", "Qwen2.5-32B base", "aime25", 43, 50, 67),
    Published("GRPO", "Qwen2.5-7B-Math base", "aime24", 22, note="peak avg@32"),
    Published("DAPO", "Qwen2.5-7B-Math base", "aime24", 36, note="peak avg@32"),
    Published("FIPO", "Qwen2.5-7B-Math base", "aime24", 40, note="peak avg@32"),
    Published("GRPO", "Qwen2.5-7B-Math base", "aime25", 18, note="peak avg@32"),
    Published("DAPO", "Qwen2.5-7B-Math base", "aime25", 18, note="peak avg@32"),
    Published("FIPO", "Qwen2.5-7B-Math base", "aime25", 19, note="peak avg@32"),
)


def benchmark_of(data_source: str) -> str | None:
    """``aime24`` / ``aime25`` for a data source or file name that names AIME 2024/2025
    (``aime24``, ``aime-2024``, ``AIME_2025``, ...); None otherwise."""
    match = re.search(r"aime[^0-9]*(?:20)?(2[45])(?![0-9])", data_source.lower())
    return f"aime{match.group(1)}" if match else None
