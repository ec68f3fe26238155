"""Synthetic arithmetic task: seeded, verl-schema rows graded by the real DAPO rule."""

from __future__ import annotations

import json
import operator

import pytest

from fipo_trainer.data.config import DataConfig
from fipo_trainer.data.dataset import parse_row
from fipo_trainer.data.synthetic import (
    ArithmeticTask,
    extract_answer,
    is_correct,
    make_rows,
    make_sft_pairs,
    solution_text,
    write_rows,
)
from fipo_trainer.rewards.dapo import compute_score

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def split_expr(expr: str) -> tuple[int, str, int]:
    for op in OPS:
        if op in expr:
            a, b = expr.split(op)
            return int(a), op, int(b)
    raise AssertionError(expr)


def test_rows_are_seeded_and_split_specific():
    assert make_rows(50, seed=1) == make_rows(50, seed=1)
    assert make_rows(50, seed=1) != make_rows(50, seed=2)
    assert make_rows(50, seed=1, split="train") != make_rows(50, seed=1, split="val")
    assert make_rows(10, seed=1) == make_rows(50, seed=1)[:10]  # prefix-stable
    assert make_rows(0) == []
    with pytest.raises(ValueError):
        make_rows(-1)


@pytest.mark.parametrize("task", [ArithmeticTask(), ArithmeticTask(digits=3, ops=("+", "-", "*"))])
def test_rows_are_verl_schema_with_correct_ground_truth(task):
    rows = make_rows(400, seed=0, task=task)
    lengths = set()
    for i, row in enumerate(rows):
        parsed = parse_row(row, "verl", DataConfig(), f"row {i}")
        expr = row["extra_info"]["expr"]
        a, op, b = split_expr(expr)
        assert parsed["ground_truth"] == str(OPS[op](a, b))
        assert int(parsed["ground_truth"]) >= 0  # subtraction is ordered
        assert len(str(a)) <= task.digits and len(str(b)) <= (1 if op == "*" else task.digits)
        assert row["prompt"] == [{"role": "user", "content": f"What is {expr}?"}]
        assert row["data_source"] == "arithmetic" and row["reward_model"]["style"] == "rule"
        lengths.add(len(str(a)))
    assert lengths == set(range(1, task.digits + 1))  # short and long operands both occur
    assert {split_expr(r["extra_info"]["expr"])[1] for r in rows} == set(task.ops)


def test_target_responses_are_short_and_graded_by_the_dapo_rule():
    for row in make_rows(100, seed=3):
        gt = row["reward_model"]["ground_truth"]
        response = solution_text(row["extra_info"]["expr"], int(gt))
        assert len(response) <= 24
        assert is_correct(response, gt)
        assert compute_score(response, gt)["score"] == 1.0
        wrong = solution_text(row["extra_info"]["expr"], int(gt) + 1)
        assert not is_correct(wrong, gt) and compute_score(wrong, gt)["score"] == -1.0


def test_extract_answer_takes_the_last_answer_line():
    assert extract_answer("Answer: 3\nanswer : 12 ") == "12"
    assert extract_answer("12+3=15") is None
    assert not is_correct("no answer", "15")


def test_sft_pairs_match_rows():
    pairs = make_sft_pairs(5, seed=4)
    assert len(pairs) == 5
    for messages, response in pairs:
        assert messages[0]["role"] == "user"
        expr = messages[0]["content"].removeprefix("What is ").removesuffix("?")
        assert response.startswith(f"{expr}=")


def test_task_validation_and_template():
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask(digits=0)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops=("/",))
    with pytest.raises(ValueError, match="expr"):
        ArithmeticTask(prompt_template="no placeholder")
    row = make_rows(
        1, task=ArithmeticTask(prompt_template="Compute {expr}. End with 'Answer: N'.")
    )[0]
    assert row["prompt"][0]["content"].startswith("Compute ")


def test_write_rows(tmp_path):
    rows = make_rows(3, seed=0)
    p = write_rows(rows, tmp_path / "a.jsonl")
    assert [json.loads(line) for line in p.read_text().splitlines()] == rows
    with pytest.raises(ValueError, match="unsupported suffix"):
        write_rows(rows, tmp_path / "a.csv")
