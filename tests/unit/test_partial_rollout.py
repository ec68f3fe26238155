"""PartialRollout (rollout/partial.py): a generation cut into segments keeps every
response whole, in order, and stamps each token with the version that made it."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from fipo_trainer.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutOutput
from fipo_trainer.rollout.config import SamplingConfig
from fipo_trainer.rollout.partial import PartialRollout, segment_seed

EOS = 0


class CountingEngine:
    """Continues each sequence with last token + 1 and stops after token `stop_at`
    (emitting EOS): deterministic, so a cut generation must equal an uncut one."""

    def __init__(self, stop_at: dict[int, int]):
        self.stop_at = stop_at  # first prompt token -> value after which EOS comes
        self.calls: list[tuple[int, int, int | None]] = []

    def __call__(self, prompts, sampling):
        self.calls.append((len(prompts), sampling.max_tokens, sampling.seed))
        out = []
        for i, p in enumerate(prompts):
            for _ in range(sampling.n):
                tokens, last = [], p[-1]
                while len(tokens) < sampling.max_tokens:
                    last = EOS if last == self.stop_at[p[0]] else last + 1
                    tokens.append(last)
                    if last == EOS:
                        break
                finish = FINISH_STOP if tokens[-1] == EOS else FINISH_LENGTH
                out.append(RolloutOutput(i, tuple(tokens), tuple([-0.5] * len(tokens)), finish))
        return out


def test_cut_generation_equals_uncut_and_stamps_versions():
    prompts = [[100, 101], [200, 201]]
    engine = CountingEngine({100: 104, 200: 215})
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=7)
    whole = engine(prompts, sampling)
    job = PartialRollout(prompts, sampling, segment_tokens=5)
    version = 0
    while not job.done:
        job.advance(engine, version)
        version += 1  # a weight sync between every two segments
    cut = job.outputs()
    assert [dataclasses.replace(o, versions=()) for o in cut] == whole
    assert cut[0].versions == (0, 0, 0, 0)  # 101 -> 102 103 104 EOS within segment 0
    assert cut[2].versions == (0,) * 5 + (1,) * 5 + (2,) * 2  # max_tokens ends it
    assert cut[2].finish_reason == FINISH_LENGTH and cut[0].finish_reason == FINISH_STOP
    # segment 0 is the uncut call's (n=2, the call's seed); later ones resume the unfinished rows, one each
    assert engine.calls[1] == (2, 5, 7)
    assert engine.calls[2:] == [(2, 5, segment_seed(7, 1)), (2, 2, segment_seed(7, 2))]


def test_later_segments_seed_from_hashed_positions():
    """Before, segment s of a call seeded from `seed * 31 + s * 1_000_003`: consecutive
    calls (seeds a block apart) put their segment s a fixed distance apart too, so the same
    pairs of streams could meet call after call. Hashed, positions follow no pattern."""
    assert segment_seed(7, 0) == 7 and segment_seed(None, 3) is None
    assert segment_seed(7, 1) == segment_seed(7, 1)  # deterministic: a resume redraws them
    calls = [1_000 + 384 * c for c in range(50)]  # 50 calls' seeds, a block of 384 apart
    for s in (1, 2, 3):
        starts = [segment_seed(c, s) for c in calls]
        steps = {b - a for a, b in itertools.pairwise(starts)}
        assert len(steps) == len(starts) - 1  # no common stride between calls


def test_outputs_before_done_and_bad_segment_are_refused():
    with pytest.raises(ValueError, match="segment_tokens"):
        PartialRollout([[1]], SamplingConfig(), segment_tokens=0)
    job = PartialRollout([[1]], SamplingConfig(max_tokens=8), segment_tokens=2)
    with pytest.raises(RuntimeError, match="before every response finished"):
        job.outputs()
