"""Reward configuration (the ``reward`` section of the trainer config)."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field

__all__ = ["BUILTIN_GRADERS", "SCORE_FORMATS", "RewardConfig", "available_cpus"]

#: Graders that routes may name; a custom function (if set) replaces them all.
BUILTIN_GRADERS = ("dapo", "math_verify")
#: score_format -> (score when correct, score when wrong / failed)
SCORE_FORMATS: dict[str, tuple[float, float]] = {"pm1": (1.0, -1.0), "binary": (1.0, 0.0)}
#: Upper limit for reward.max_abs_score: a group's sum of squares stays finite in float32.
MAX_SCORE_BOUND = 1e15
#: Lower limit for reward.max_memory_mb: below it no grader process can start.
MIN_MEMORY_MB = 64


def _default_routes() -> dict[str, str]:
    return {"math_dapo": "dapo", "aime*": "dapo", "math500": "math_verify"}


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class RewardConfig:
    """How responses are graded.

    Routing: ``routes`` maps a ``data_source`` (exact name or fnmatch pattern such as
    ``aime*``, case-insensitive, exact names first, then patterns in order) to a grader in
    ``BUILTIN_GRADERS``; unmatched sources use ``default_grader``. When ``custom_function``
    (``"path/to/file.py:function_name"``) is set it grades every item, as in verl.
    """

    routes: dict[str, str] = field(default_factory=_default_routes)
    default_grader: str = "math_verify"
    custom_function: str | None = None
    #: "pm1": correct +1 / wrong -1; "binary": 1 / 0 (built-in graders and failures).
    score_format: str = "pm1"
    #: Per-item wall-clock limit; a grader past it is killed and the item gets the failure score.
    timeout_s: float = 10.0
    #: Grader processes; None = one per available CPU, at most 8.
    num_workers: int | None = None
    #: DAPO rule: when no "Answer:" line is found, grade the last \\boxed{} instead (later
    #: verl releases); off = the published rule (the paper recipes).
    dapo_boxed_fallback: bool = False
    #: Items per task sent to a worker: the cheap DAPO rule is batched to cut IPC cost.
    dapo_chunk_size: int = 128
    #: Items per task for other graders (math-verify chunks keep a prompt's group together).
    chunk_size: int = 16
    #: Seconds a new worker may take to import and warm up before grade() gives up.
    startup_timeout_s: float = 180.0
    #: Largest |score| a grader may return; a score beyond it (or not finite in float32, the
    #: dtype advantages are computed in) fails that item. Rewards are O(1); 1e4 leaves room
    #: for custom scales yet keeps squares and sums over a group far from float32's 3.4e38.
    #: None = only the float32 finiteness check.
    max_abs_score: float | None = 1e4
    #: Address-space limit (RLIMIT_AS) of each grader process in MiB: a runaway grader gets
    #: MemoryError (its item fails) instead of waking the machine's OOM killer. None = unlimited.
    max_memory_mb: int | None = None
    # DAPO overlong reward shaping (on the response length in tokens).
    overlong_buffer_enable: bool = False
    overlong_buffer_len: int = 4096
    overlong_penalty_factor: float = 1.0
    max_response_length: int | None = None

    def __post_init__(self) -> None:
        self.routes = {str(k): str(v) for k, v in dict(self.routes).items()}
        self.validate(complete=False)

    def validate(self, complete: bool = True) -> None:
        """Check every field (again, after edits); ``complete=False`` allows
        ``max_response_length`` to be filled in later by the trainer."""
        for source, grader in self.routes.items():
            if grader not in BUILTIN_GRADERS:
                raise ValueError(
                    f"reward.routes[{source!r}] = {grader!r} is not a grader; "
                    f"use one of {list(BUILTIN_GRADERS)} (or set reward.custom_function)"
                )
        if self.default_grader not in BUILTIN_GRADERS:
            raise ValueError(
                f"reward.default_grader = {self.default_grader!r}; use one of {list(BUILTIN_GRADERS)}"
            )
        if self.custom_function is not None and ":" not in str(self.custom_function):
            raise ValueError(
                f"reward.custom_function = {self.custom_function!r} must look like "
                "'path/to/file.py:function_name'"
            )
        if self.score_format not in SCORE_FORMATS:
            raise ValueError(
                f"reward.score_format = {self.score_format!r}; use one of {list(SCORE_FORMATS)}"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(
                f"reward.num_workers must be >= 1 or null (auto), got {self.num_workers}"
            )
        if self.dapo_chunk_size < 1 or self.chunk_size < 1:
            raise ValueError("reward.dapo_chunk_size and reward.chunk_size must be >= 1")
        if self.max_abs_score is not None and not 0 < self.max_abs_score <= MAX_SCORE_BOUND:
            raise ValueError(
                f"reward.max_abs_score must be in (0, {MAX_SCORE_BOUND:g}] or null, "
                f"got {self.max_abs_score}"
            )
        if self.max_memory_mb is not None and self.max_memory_mb < MIN_MEMORY_MB:
            raise ValueError(
                f"reward.max_memory_mb must be >= {MIN_MEMORY_MB} (a grader process needs "
                f"~100-200 MiB of address space to start) or null, got {self.max_memory_mb}"
            )
        if not self.overlong_buffer_enable:
            return
        if self.max_response_length is None:
            if complete:
                raise ValueError(
                    "reward.overlong_buffer_enable needs reward.max_response_length "
                    "(the rollout's maximum response length in tokens)"
                )
        elif not 0 < self.overlong_buffer_len <= self.max_response_length:
            raise ValueError(
                f"reward.overlong_buffer_len = {self.overlong_buffer_len} must be in "
                f"(0, max_response_length={self.max_response_length}]"
            )

    @property
    def correct_score(self) -> float:
        return SCORE_FORMATS[self.score_format][0]

    @property
    def failure_score(self) -> float:
        """Score for wrong answers and for items whose grader timed out or failed."""
        return SCORE_FORMATS[self.score_format][1]

    @property
    def used_graders(self) -> set[str]:
        """Graders that some data source may be routed to."""
        if self.custom_function is not None:
            return {"custom"}
        return {self.default_grader, *self.routes.values()}

    @property
    def resolved_num_workers(self) -> int:
        return self.num_workers if self.num_workers is not None else min(available_cpus(), 8)

    def grader_for(self, data_source: str) -> str:
        """Grader name for one data source ("custom" when a custom function is set)."""
        if self.custom_function is not None:
            return "custom"
        source = str(data_source).lower()
        for pattern, grader in self.routes.items():
            if pattern.lower() == source:
                return grader
        for pattern, grader in self.routes.items():
            if fnmatch.fnmatchcase(source, pattern.lower()):
                return grader
        return self.default_grader
