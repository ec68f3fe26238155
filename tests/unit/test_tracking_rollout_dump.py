"""Rollout dumps: one jsonl per step with the required fields, JSON-safe values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fipo_trainer.trainer.rollout_dump import REQUIRED_FIELDS, dump_rollouts


def test_dump_writes_one_line_per_record_with_required_fields(tmp_path):
    records = [
        {
            "prompt": [{"role": "user", "content": "What is 1+2?"}],
            "response": "1+2=3\nAnswer: 3",
            "score": np.float32(1.0),
            "acc": np.bool_(True),
            "data_source": "arithmetic",
            "ground_truth": "3",
            "uid": "u0",
            "pred": "3",
        },
        {"response": "garbage", "score": float("nan"), "acc": False, "logp": torch.tensor([0.5, -1.0])},
    ]
    path = dump_rollouts(tmp_path, 7, records)
    assert path == tmp_path / "rollouts" / "step_000007.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2
    assert list(rows[0])[: len(REQUIRED_FIELDS)] == list(REQUIRED_FIELDS)
    assert rows[0]["score"] == 1.0 and rows[0]["acc"] is True and rows[0]["uid"] == "u0"
    assert rows[0]["prompt"][0]["content"] == "What is 1+2?" and rows[0]["step"] == 7
    assert rows[1]["prompt"] is None and rows[1]["ground_truth"] is None  # missing -> null
    assert rows[1]["score"] is None and rows[1]["logp"] == [0.5, -1.0]
    # re-dumping a step (after a resume) replaces the file
    dump_rollouts(tmp_path, 7, records[:1])
    assert len(path.read_text().splitlines()) == 1
    assert not list((tmp_path / "rollouts").glob(".*"))  # no temp files left
    with pytest.raises(ValueError, match="step"):
        dump_rollouts(tmp_path, -1, records)
