"""Chunked fp32 token log-probs: values, gradient, entropy, temperature."""

from __future__ import annotations

import pytest
import torch

from fipo_trainer.actor.logprob import token_log_probs


def reference(logits, targets, temperature=1.0):
    lsm = torch.log_softmax(logits.double() / temperature, -1)
    logp = lsm.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_log_softmax_and_its_gradient(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(10, 37, generator=g) * 3).requires_grad_(True)
    targets = torch.randint(0, 37, (10,), generator=g)
    w = torch.randn(10, generator=g)
    logp, ent = token_log_probs(
        logits, targets, temperature=temperature, chunk_size=chunk, with_entropy=True
    )
    ref_logp, ref_ent = reference(logits, targets, temperature)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    assert logp.dtype == torch.float32 and not ent.requires_grad
    (grad,) = torch.autograd.grad((logp * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_logp * w.double()).sum(), logits)
    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=1e-5, rtol=1e-5)


def test_bf16_logits_give_fp32_results_and_bf16_grads():
    logits = torch.randn(6, 50).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 50, (6,))
    logp, ent = token_log_probs(logits, targets)
    assert logp.dtype == torch.float32 and ent is None
    ref, _ = reference(logits.float(), targets)
    torch.testing.assert_close(logp.double(), ref, atol=1e-5, rtol=1e-5)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_no_grad_and_grad_paths_agree_bitwise():
    logits = torch.randn(9, 33)
    targets = torch.randint(0, 33, (9,))
    with torch.no_grad():
        a, _ = token_log_probs(logits, targets, chunk_size=4)
    b, _ = token_log_probs(logits.clone().requires_grad_(True), targets, chunk_size=4)
    assert torch.equal(a, b.detach())


def test_bad_input():
    with pytest.raises(ValueError, match=r"logits \[K, V\]"):
        token_log_probs(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_log_probs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), temperature=0)
