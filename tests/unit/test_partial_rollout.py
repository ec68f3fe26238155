"""PartialRollout (rollout/partial.py): a generation cut into segments keeps every
response whole, in order, and stamps each token with the version that made it."""

from __future__ import annotations

import dataclasses

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
    # segment s seeds its rows from 7 + s x (2 prompts x n=2): blocks that cannot overlap
    assert engine.calls[2:] == [(2, 5, 11), (2, 2, 15)]
    assert [segment_seed(7, s, 4) for s in range(3)] == [7, 11, 15]


def test_segment_seeds_stay_in_the_calls_block_and_apart():
    """Before, a later segment's seed was `seed * 31 + s * 1_000_003`: a point anywhere,
    which could land inside another call's or segment's seeds."""
    responses, segments = 512 * 16, 20
    starts = [segment_seed(1_000, s, responses) for s in range(segments)]
    assert starts == [1_000 + s * responses for s in range(segments)]
    assert segment_seed(None, 3, responses) is None


def test_outputs_before_done_and_bad_segment_are_refused():
    with pytest.raises(ValueError, match="segment_tokens"):
        PartialRollout([[1]], SamplingConfig(), segment_tokens=0)
    job = PartialRollout([[1]], SamplingConfig(max_tokens=8), segment_tokens=2)
    with pytest.raises(RuntimeError, match="before every response finished"):
        job.outputs()


def test_shards_of_a_cut_call_seed_apart_in_every_segment():
    """Two engines' shards of one call: segment s of each seeds its unfinished rows from
    the call's s-th block (stride = the whole call's responses). With the shard's own
    responses as the stride, shard 0's segment 1 began at shard 1's segment-0 seed."""
    prompts = [[100 + 10 * i, 101 + 10 * i] for i in range(4)]
    engine = CountingEngine({p[0]: p[0] + 30 for p in prompts})  # none stops early
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=50)
    used: list[range] = []
    for first in (0, 2):
        engine.calls.clear()
        job = PartialRollout(
            prompts[first : first + 2], sampling.for_shard(first), 5, call_responses=4 * 2
        )
        while not job.done:
            job.advance(engine, 0)
        for rows, _, seed in engine.calls:
            per_row = 2 if seed in (50, 54) else 1  # segment 0 seeds a prompt's n samples
            used.append(range(seed, seed + rows * per_row))
    seeds = [s for r in used for s in r]
    assert len(seeds) == len(set(seeds)) == 4 * 2 * 3  # 8 responses x 3 segments
