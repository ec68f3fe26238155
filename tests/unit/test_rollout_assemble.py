"""The per-response batch layout built from engine outputs (stage ``generate``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fipo_trainer.data.batch import Batch
from fipo_trainer.data.schema import check_stage_output
from fipo_trainer.rollout.assemble import (
    assemble_responses,
    build_rollout_batch,
    expand_prompt_fields,
    generate_inputs,
    prompt_token_lists,
    rollout_metrics,
)
from fipo_trainer.rollout.base import RolloutOutput, check_prompts
from fipo_trainer.rollout.config import SamplingConfig
from fipo_trainer.rollout.group import merge_rollout_metrics, split_prompts

PAD = 0


def _outputs():
    # prompt 0 -> two responses (one stops with EOS=9, one truncated); prompt 1 -> two
    return [
        RolloutOutput(0, (5, 9), (-0.5, -0.1), "stop"),
        RolloutOutput(0, (6, 7, 8), (-1.0, -2.0, -3.0), "length"),
        RolloutOutput(1, (9,), (-0.2,), "stop"),
        RolloutOutput(1, (4, 4, 9), (-0.3, -0.3, -0.4), "stop"),
    ]


def test_assemble_shapes_masks_positions():
    prompts = [[11, 12, 13], [21]]
    t = assemble_responses(prompts, _outputs(), n=2, pad_token_id=PAD, response_length=4)
    assert t["input_ids"].shape == (4, 7) and t["responses"].shape == (4, 4)
    assert t["input_ids"][2, :3].tolist() == [PAD, PAD, 21]  # left-padded prompt
    assert t["responses"][0].tolist() == [5, 9, PAD, PAD]  # right-padded, EOS kept
    assert torch.equal(t["input_ids"][:, 3:], t["responses"])
    assert t["attention_mask"][2].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert t["response_mask"].dtype == torch.float32
    assert t["response_mask"].sum(1).tolist() == [2, 3, 1, 3]
    assert t["rollout_log_probs"][1].tolist() == [-1.0, -2.0, -3.0, 0.0]


def test_assemble_keeps_given_prompt_width_and_rejects_misordered_outputs():
    t = assemble_responses(
        [[1], [2]], _outputs(), n=2, pad_token_id=PAD, response_length=3, prompt_width=5
    )
    assert t["input_ids"].shape == (4, 8)
    bad = _outputs()
    bad[1], bad[2] = bad[2], bad[1]
    with pytest.raises(ValueError, match="belongs to prompt 1, expected 0"):
        assemble_responses([[1], [2]], bad, n=2, pad_token_id=PAD, response_length=3)
    with pytest.raises(ValueError, match="response_length"):
        assemble_responses([[1], [2]], _outputs(), n=2, pad_token_id=PAD, response_length=2)
    with pytest.raises(ValueError, match="4 responses for 2 prompts x n=3"):
        assemble_responses([[1], [2]], _outputs(), n=3, pad_token_id=PAD, response_length=3)


def test_prompt_token_lists_from_tensors_or_lists():
    ids = torch.tensor([[PAD, 11, 12], [PAD, PAD, 21]])
    mask = (ids != PAD).long()
    prompts, width = prompt_token_lists(Batch({"input_ids": ids, "attention_mask": mask}))
    assert prompts == [[11, 12], [21]] and width == 3
    prompts, width = prompt_token_lists(Batch(non_tensors={"prompt_token_ids": [[1, 2], [3]]}))
    assert prompts == [[1, 2], [3]] and width is None
    with pytest.raises(ValueError, match="prompt_token_ids"):
        prompt_token_lists(Batch(non_tensors={"prompt_text": ["a", "b"]}))


def test_worker_gets_token_ids_and_driver_repeats_prompt_fields():
    ids = torch.tensor([[PAD, 11, 12], [PAD, PAD, 21]])
    prompt_batch = Batch(
        {
            "input_ids": ids,
            "attention_mask": (ids != PAD).long(),
            "position_ids": torch.zeros_like(ids),
        },
        {
            "uid": ["a", "b"],
            "ground_truth": ["3", "4"],
            "data_source": ["x", "y"],
            "source": ["f:0", "f:1"],  # read by nobody: dropped
        },
    )
    sent = generate_inputs(prompt_batch)
    assert sorted(sent.keys()) == ["attention_mask", "input_ids"]
    out = build_rollout_batch(
        sent,
        _outputs(),
        n=2,
        pad_token_id=PAD,
        response_length=4,
        response_text=["r0", "r1", "r2", "r3"],
    )
    check_stage_output("generate", out.keys())
    out |= expand_prompt_fields(prompt_batch, 2)
    assert len(out) == 4
    assert list(out["uid"]) == ["a", "a", "b", "b"]
    assert list(out["ground_truth"]) == ["3", "3", "4", "4"]
    assert "source" not in out and "position_ids" not in out
    assert out["input_ids"].shape == (4, 7)
    m = merge_rollout_metrics([rollout_metrics(_outputs()[:2], 2.0), rollout_metrics([], 1.0)])
    assert m["rollout/response_tokens"] == 5 and m["rollout/tokens_per_s"] == 2.5


def test_missing_uid_gets_one_per_prompt():
    fields = expand_prompt_fields(Batch(non_tensors={"prompt_token_ids": [[1], [2]]}), 2)
    uids = list(fields["uid"])
    assert uids[0] == uids[1] != uids[2] == uids[3]
    assert fields.keys() == ["uid"]
    assert isinstance(fields["uid"], np.ndarray)


def test_metrics_and_prompt_checks():
    assert merge_rollout_metrics([rollout_metrics([], 0.0)])["rollout/tokens_per_s"] == 0.0
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        check_prompts([[1], []], 10, None)
    with pytest.raises(ValueError, match="prompt 0 has token id 12 outside"):
        check_prompts([[1, 12]], 10, None)
    with pytest.raises(ValueError, match="max_model_len=3"):
        check_prompts([[1, 2, 3]], 10, 3)
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        RolloutOutput(0, (1, 2), (-1.0,), "stop")


def test_common_prompt_width_for_list_prompts():
    out = build_rollout_batch(
        Batch(non_tensors={"prompt_token_ids": [[1], [2, 3]]}),
        _outputs(),
        n=2,
        pad_token_id=PAD,
        response_length=4,
        response_text=["a"] * 4,
        prompt_width=6,
    )
    assert out["input_ids"].shape == (4, 10)
    assert out["input_ids"][3, :6].tolist() == [0, 0, 0, 0, 2, 3]


def test_split_prompts_cuts_consecutive_shards_each_seeded_from_its_first_row():
    ids = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    prompts = Batch(non_tensors={"prompt_token_ids": ids})
    split = split_prompts(prompts, SamplingConfig(n=3, seed=10, max_tokens=4), engines=2)
    assert [len(shard) for shard in split.inputs] == [3, 2]
    assert split.first_rows.tolist() == [0, 3]
    assert [s.seed for s in split.sampling] == [10, 10 + 3 * 3]
    assert split.width == 3 and split.n == 3 and split.rows_per_engine == 9
    assert split.max_tokens == 4
    joined = [row for shard in split.inputs for row in shard.non_tensors["prompt_token_ids"]]
    assert joined == ids
    # more engines than prompts: one prompt each, no empty shard
    few = split_prompts(prompts[:2], SamplingConfig(n=2, seed=None), engines=4)
    assert len(few.inputs) == 2 and [s.seed for s in few.sampling] == [None, None]
