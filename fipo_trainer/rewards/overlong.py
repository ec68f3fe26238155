"""DAPO overlong reward shaping: a soft, linear penalty near the response-length limit.

Responses longer than ``max_response_length - buffer_len`` tokens lose reward linearly, reaching
``-penalty_factor`` at ``max_response_length``; shorter ones are untouched. The penalty is added
to the score while ``acc`` stays the grader's verdict (dynamic sampling filters on ``acc``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["overlong_penalties", "overlong_penalty"]


def overlong_penalty(
    response_length: int, max_response_length: int, buffer_len: int, penalty_factor: float = 1.0
) -> float:
    """min(-(L - (L_max - buffer)) / buffer * factor, 0) for one response of L tokens."""
    if buffer_len <= 0:
        raise ValueError(f"overlong buffer_len must be > 0, got {buffer_len}")
    if response_length < 0:
        raise ValueError(f"response_length must be >= 0, got {response_length}")
    exceed = response_length - (max_response_length - buffer_len)
    return min(-exceed / buffer_len * penalty_factor, 0.0)


def overlong_penalties(
    response_lengths: Sequence[int],
    max_response_length: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> list[float]:
    """Vectorless batch form of :func:`overlong_penalty` (lengths are plain ints)."""
    return [
        overlong_penalty(int(n), max_response_length, buffer_len, penalty_factor)
        for n in response_lengths
    ]
