"""The batch schema: one producer per field, the actor's reads, stages return only theirs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fipo_trainer.data.batch import Batch
from fipo_trainer.data.schema import (
    ACTOR_LOG_PROB_READS,
    ACTOR_UPDATE_READS,
    FIELDS,
    STAGES,
    check_stage_output,
    produced_by,
)
from fipo_trainer.trainer.loop import advantages
from fipo_trainer.trainer.sampling import reward_fields


def test_every_field_has_one_known_producer_and_a_reader():
    for f in FIELDS.values():
        assert f.producer in STAGES, f
        assert f.readers, f"{f.name} is read by nobody: remove it"
        assert f.kind in ("tensor", "object")
    assert sum(len(produced_by(s)) for s in STAGES) == len(FIELDS)


def test_actor_reads_what_earlier_stages_produce():
    for name in ACTOR_UPDATE_READS:
        assert "actor" in FIELDS[name].readers
    assert set(ACTOR_LOG_PROB_READS) < set(ACTOR_UPDATE_READS)
    assert FIELDS["old_log_probs"].producer == "log_prob"


def test_grade_and_advantage_stages_return_exactly_their_fields():
    check_stage_output(
        "grade", reward_fields(SimpleNamespace(scores=[1.0], acc=[True], preds=["1"])).keys()
    )
    batch = Batch(
        {"response_mask": torch.ones(2, 3)}, {"score": [1.0, 0.0], "uid": ["a", "a"]}
    )
    algo = SimpleNamespace(adv_estimator="grpo", norm_adv_by_std_in_grpo=True)
    check_stage_output("advantages", advantages(batch, algo).keys())
    with pytest.raises(ValueError, match="extra: \\['x'\\]"):
        check_stage_output("advantages", ["advantages", "x"])
