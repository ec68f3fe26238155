"""The loop's pure pieces: reward attachment, dynamic sampling, joining rounds, seeds."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fipo_trainer.data.batch import Batch, to_object_array
from fipo_trainer.trainer.loop import (
    attach_rewards,
    concat_rollouts,
    filter_groups,
    finite_or_raise,
    step_seed,
    take_groups,
    validation_summary,
)


def rollout(uids, accs, prompt_width=3, response_width=4, pad=9):
    n = len(uids)
    prompts = torch.full((n, prompt_width), pad)
    prompts[:, -2:] = 5  # two real prompt tokens, left-padded
    responses = torch.arange(n * response_width).view(n, response_width)
    lengths = torch.tensor([1 + i % response_width for i in range(n)])
    response_mask = (torch.arange(response_width)[None, :] < lengths[:, None]).float()
    attn = torch.cat([(prompts != pad).long(), response_mask.long()], dim=1)
    b = Batch(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attn,
            "position_ids": (attn.cumsum(1) - 1).clamp(min=0),
            "response_mask": response_mask,
        },
        {"uid": to_object_array(uids)},
    )
    return attach_rewards(
        b,
        SimpleNamespace(scores=[1.0 if a else -1.0 for a in accs], acc=list(accs), preds=["p"] * n),
    )


def test_attach_rewards_puts_score_on_last_response_token():
    b = rollout(["a", "a", "b", "b"], [True, False, False, False])
    scores = b["token_level_scores"]
    lengths = b["response_mask"].sum(-1).long()
    for i in range(4):
        assert scores[i].sum() == (1.0 if i == 0 else -1.0)
        assert scores[i, lengths[i] - 1] != 0
    assert list(b.non_tensors["acc"]) == [True, False, False, False]


def test_filter_groups_keeps_groups_with_varying_accuracy_whole_and_in_order():
    b = rollout(["a", "a", "b", "b", "c", "c"], [True, False, False, False, True, True])
    kept, n_kept, seen = filter_groups(b, "acc")
    assert (n_kept, seen) == (1, 3)
    assert list(kept.non_tensors["uid"]) == ["a", "a"]
    b2 = rollout(["a", "a", "b", "b", "c", "c"], [True, False, True, False, False, True])
    kept2, n2, _ = filter_groups(b2, "acc")
    assert n2 == 3 and len(kept2) == 6
    assert list(take_groups(kept2, 2).non_tensors["uid"]) == ["a", "a", "b", "b"]


def test_concat_rollouts_left_pads_prompt_side_of_different_rounds():
    narrow = rollout(["a", "a"], [True, False], prompt_width=3)
    wide = rollout(["b", "b"], [True, False], prompt_width=5)
    with pytest.raises(ValueError, match="trailing shapes"):
        Batch.concat([narrow, wide])
    joined = concat_rollouts([narrow, wide], pad_token_id=9)
    assert joined["input_ids"].shape == (4, 9)
    # the response part stays aligned at the right end and real tokens are unchanged
    assert torch.equal(joined["responses"][:2], narrow["responses"])
    assert torch.equal(joined["input_ids"][:2, -4:], narrow["responses"])
    assert torch.equal(joined["attention_mask"][:2, :2], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(joined["attention_mask"].sum(1)[:2], narrow["attention_mask"].sum(1))


def test_step_seed_depends_on_step_and_round_only():
    seeds = {step_seed(0, s, r) for s in range(1, 50) for r in range(1, 5)}
    assert len(seeds) == 49 * 4
    assert step_seed(3, 7, 2) == step_seed(3, 7, 2) != step_seed(4, 7, 2)


def test_finite_check_and_validation_summary():
    assert finite_or_raise(
        {"a": 1.0, "b": float("nan"), "c": float("inf")}, ("a", "b", "c", "d")
    ) == ["b", "c"]
    vals = [{"val/mean@4": 0.2}, {"val/mean@4": 0.5}, {"val/mean@4": 0.4}]
    assert validation_summary(vals) == ("val/mean@4", 0.2, 0.5)
    assert validation_summary([]) is None
    assert np.isclose(validation_summary(vals)[2] - validation_summary(vals)[1], 0.3)
