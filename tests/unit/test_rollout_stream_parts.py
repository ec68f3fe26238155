"""How many parts an engine streams a generate call in (``rollout.group.stream_parts``).

Small calls go whole: a part's round trip cost more than the grading it hid (quickstart:
4 parts 0.368 s/step, 1 part 0.328 s). Large ones keep streaming, so grading overlaps
generation where it takes time (long responses, math-verify).
"""

from __future__ import annotations

from fipo_trainer.rollout.group import MIN_PART_TOKENS, STREAM_PARTS, stream_parts


def test_quickstart_sized_calls_are_one_part() -> None:
    assert stream_parts(16 * 8, 24) == 1  # a plain quickstart step
    assert stream_parts(24 * 8, 24) == 1  # a dynamic-sampling round
    assert stream_parts(64 * 4, 24) == 1  # its validation


def test_long_responses_stream_in_several_parts_up_to_the_cap() -> None:
    assert stream_parts(24 * 8, 128) == 3  # the rollout-heavy benchmark shape
    assert stream_parts(512 * 16, 20480) == STREAM_PARTS  # the paper's step
    assert stream_parts(512 * 16, 20480, most=2) == 2


def test_every_part_holds_at_least_the_minimum() -> None:
    for responses in (1, 7, 64, 300, 5000):
        for max_tokens in (1, 24, 128, 4096):
            parts = stream_parts(responses, max_tokens)
            assert 1 <= parts <= STREAM_PARTS
            assert parts == 1 or responses * max_tokens / parts >= MIN_PART_TOKENS
