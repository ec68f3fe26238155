"""scripts/bench_engine_round.py: every call gets the next prompts (as the trainer's rounds
do), the calls of a round alternate, warm-up calls stay out of the median, and the fit
recovers a straight line."""

from __future__ import annotations

import pytest

from tests.helpers.scripts import load_script

ber = load_script("bench_engine_round")


def test_the_cursor_hands_out_the_next_prompts_and_wraps_around():
    cursor = ber.PromptCursor([[i] for i in range(5)])
    assert cursor.take(2) == [[0], [1]]
    assert cursor.take(2) == [[2], [3]]
    assert cursor.take(2) == [[0], [1]]  # 2 more would run past the end: start again


def test_timed_rounds_alternate_calls_with_fresh_inputs_and_skip_warmup():
    seen: list[tuple[str, int]] = []
    counter = iter(range(100))
    calls = {name: (lambda arg, name=name: seen.append((name, arg))) for name in ("a", "b")}
    medians = ber.timed_rounds(calls, rounds=3, inputs=lambda: next(counter))
    rounds = ber.WARMUP + 3
    assert [name for name, _ in seen] == ["a", "b"] * rounds
    assert [arg for _, arg in seen] == list(range(2 * rounds))  # no call reuses inputs
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())


def test_least_squares_recovers_a_line():
    assert ber.least_squares([16, 24, 32], [0.1 + 0.008 * x for x in (16, 24, 32)]) == (
        pytest.approx(0.008),
        pytest.approx(0.1),
    )
    assert ber.least_squares([24, 24], [0.2, 0.3]) == (0.0, pytest.approx(0.25))


def test_one_size_is_refused():
    with pytest.raises(SystemExit):
        ber.main(["--prompts", "24"])
