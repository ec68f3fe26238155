"""Token-budget planning and padding-free packing (checked against a padded HF forward)."""

from __future__ import annotations

import pytest
import torch

from fipo_trainer.actor.micro_batch import (
    pack_rows,
    plan_fixed_size,
    plan_token_budget,
    unpack_to_rows,
)
from fipo_trainer.actor.synthetic_batch import random_rollout_batch


def test_plan_token_budget_respects_budget_and_minimum():
    lengths = [30, 5, 17, 40, 8, 8, 22, 3]
    for budget in (40, 60, 100, 1000):
        parts = plan_token_budget(lengths, budget)
        assert sorted(i for p in parts for i in p) == list(range(8))
        assert all(sum(lengths[i] for i in p) <= budget for p in parts)
        assert len(parts) >= -(-sum(lengths) // budget)
        assert [p[0] for p in parts] == sorted(p[0] for p in parts)
    assert len(plan_token_budget(lengths, 1000)) == 1
    assert len(plan_token_budget(lengths, 1000, min_micro_batches=3)) == 3
    with pytest.raises(ValueError, match=r"40 tokens does not fit actor.x=39"):
        plan_token_budget(lengths, 39, budget_key="actor.x")


def test_plan_fixed_size():
    assert plan_fixed_size(5, 2) == [[0, 1], [2, 3], [4]]


def test_pack_and_unpack_layout():
    batch = random_rollout_batch(
        num_prompts=3, n=2, vocab_size=50, prompt_width=6, response_width=5
    )
    ids, attn = batch["input_ids"], batch["attention_mask"]
    packed = pack_rows(ids, attn, prompt_width=6)
    assert packed.num_tokens == int(attn.sum())
    assert packed.response_lengths == batch["response_mask"].sum(-1).long().tolist()
    # Each target is the token right after its logit position, and equals the response token.
    flat = packed.input_ids[0]
    assert torch.equal(flat[packed.logit_positions + 1], packed.targets)
    back = unpack_to_rows(packed.targets.float(), packed.response_lengths, 5)
    assert torch.equal(back, batch["responses"].float() * batch["response_mask"])
    # Position ids restart at 0 for each sequence.
    assert int((packed.position_ids[0] == 0).sum()) == len(batch)


def test_pack_rejects_bad_layouts():
    ids = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="empty prompt"):
        pack_rows(ids, torch.tensor([[0, 0, 0, 1, 1, 0]]), prompt_width=3)
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, torch.tensor([[0, 1, 1, 0, 1, 1]]), prompt_width=3)


def test_packed_forward_matches_padded_forward():
    from transformers import AutoModelForCausalLM

    from fipo_trainer.data.tiny_model import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(), attn_implementation="sdpa")
    model.eval()
    batch = random_rollout_batch(
        num_prompts=3, n=2, vocab_size=200, prompt_width=8, response_width=7
    )
    ids, attn, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        ref = torch.log_softmax(padded[:, 7:-1].float(), -1)
        ref = ref.gather(-1, batch["responses"][..., None]).squeeze(-1) * batch["response_mask"]
        packed = pack_rows(ids, attn, prompt_width=8)
        logits = model(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            logits_to_keep=packed.logit_positions,
            use_cache=False,  # with a cache transformers ignores the packing (cross-talk)
        ).logits[0]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, packed.targets[:, None]).squeeze(-1)
    got = unpack_to_rows(lp, packed.response_lengths, 7)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
