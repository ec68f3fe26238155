"""One padded sdpa call for a packed row's sequences (``actor/varlen_sdpa.py``): the layout,
equality with the per-sequence loop (outputs and gradients, GQA too), when it falls back to
the loop, and that the ulysses attention takes it."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fipo_trainer.actor import ulysses, varlen_sdpa
from fipo_trainer.actor.varlen_sdpa import padded_causal_attention, padded_layout


def _spans(lengths: list[int]) -> list[tuple[int, int]]:
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [(a, a + n) for a, n in zip(starts, lengths, strict=True)]


def test_layout_gathers_each_sequence_and_scatters_back_in_packed_order():
    layout = padded_layout(_spans([3, 1, 2]), torch.device("cpu"))
    assert layout is not None and (layout.num_sequences, layout.max_length) == (3, 3)
    # pads point at their own sequence's first token
    assert layout.gather.tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 4]]
    assert layout.scatter.tolist() == [0, 1, 2, 3, 6, 7]
    packed = torch.arange(6)
    assert packed[layout.gather].flatten()[layout.scatter].tolist() == packed.tolist()


@pytest.mark.parametrize(
    "lengths",
    [
        [5],  # one sequence: nothing to batch
        [2, 2, 2, 90],  # one long among short ones: 4 * 90^2 - 8112 = 24288 > 3 * 4096
        [20, 130] * 4,  # few long ones: 8 * 130^2 - 69200 = 66000 > 7 * 4096
    ],
)
def test_layout_keeps_the_loop_when_padding_costs_too_much(lengths):
    assert padded_layout(_spans(lengths), torch.device("cpu")) is None


class _Module:
    """What transformers' sdpa attention reads off the attention module."""

    def __init__(self, groups: int) -> None:
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def _loop(module, q, k, v, spans):
    pieces = [
        sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None)[0]
        for a, b in spans
    ]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (4, 2)])
def test_padded_call_equals_the_per_sequence_loop_with_gradients(heads, kv_heads):
    torch.manual_seed(0)
    spans = _spans([7, 1, 12, 10, 6, 12])  # a one-token sequence too
    total, dim = spans[-1][1], 8
    q = torch.randn(1, heads, total, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    module = _Module(heads // kv_heads)
    layout = padded_layout(spans, q.device)
    assert layout is not None

    ref = _loop(module, q, k, v, spans)
    weights = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    out = padded_causal_attention(sdpa_attention_forward, module, q, k, v, layout, {})
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))

    assert out.shape == ref.shape == (1, total, heads, dim)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _count_sdpa_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize(("pairs_per_call", "calls_per_layer"), [(4096, 1), (0, 5)])
def test_ulysses_attention_runs_one_padded_call_per_layer(
    monkeypatch, pairs_per_call, calls_per_layer
):
    name = ulysses.install("sdpa")
    ulysses.set_group(None, 1, 0)
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_implementation=name,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    lengths = [6, 9, 4, 8, 7]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, 64, pos.shape)

    monkeypatch.setattr(varlen_sdpa, "PAIRS_PER_CALL", 0)
    ulysses.set_sequence(pos)
    looped = model(input_ids=ids, position_ids=pos).logits
    monkeypatch.setattr(varlen_sdpa, "PAIRS_PER_CALL", pairs_per_call)
    calls = _count_sdpa_calls(monkeypatch)
    ulysses.set_sequence(pos)
    logits = model(input_ids=ids, position_ids=pos).logits

    assert calls[0] == calls_per_layer * config.num_hidden_layers
    torch.testing.assert_close(logits, looped, rtol=0, atol=1e-5)
