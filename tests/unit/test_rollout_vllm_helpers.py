"""Pure helpers of the vLLM adapter (no engine needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fipo_trainer.rollout.vllm_engine import _sampled_logprobs, _with_tied_lm_head


def test_tied_stream_gets_lm_head_right_after_the_embedding():
    emb, w = torch.ones(4, 2), torch.zeros(2, 2)
    stream = [("model.embed_tokens.weight", emb), ("model.layers.0.w", w)]
    out = list(_with_tied_lm_head(stream))
    assert [n for n, _ in out] == [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.w",
    ]
    assert out[1][1] is emb


def test_tied_stream_with_its_own_lm_head_is_not_duplicated():
    emb, head = torch.ones(4, 2), torch.full((4, 2), 2.0)
    late = list(_with_tied_lm_head([("model.embed_tokens.weight", emb), ("lm_head.weight", head)]))
    assert [n for n, _ in late] == ["model.embed_tokens.weight", "lm_head.weight"]
    early = list(_with_tied_lm_head([("lm_head.weight", head), ("model.embed_tokens.weight", emb)]))
    assert [n for n, _ in early] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert early[0][1] is head


def test_sampled_logprobs_picks_the_sampled_token():
    steps = [
        {3: SimpleNamespace(logprob=-0.5), 7: SimpleNamespace(logprob=-0.1)},
        {9: SimpleNamespace(logprob=-2.0)},
    ]
    assert _sampled_logprobs([3, 9], steps) == (-0.5, -2.0)
    with pytest.raises(RuntimeError, match="logprobs=0"):
        _sampled_logprobs([3, 9], None)
    with pytest.raises(RuntimeError, match="1 log-prob entries for 2 tokens"):
        _sampled_logprobs([3, 9], steps[:1])
