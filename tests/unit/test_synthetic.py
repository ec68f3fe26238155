"""Synthetic arithmetic task: seeded, verl-schema rows graded by the real DAPO rule."""

from __future__ import annotations

import dataclasses
import hashlib
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
    max_solution_chars,
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


def test_worked_solution_is_long_and_graded_by_the_dapo_rule():
    task = ArithmeticTask(digits=1, ops=("+", "-", "*"), solution="worked")
    for messages, response in make_sft_pairs(200, seed=5, task=task):
        expr = messages[0]["content"].removeprefix("What is ").removesuffix("?")
        a, op, b = split_expr(expr)
        gt = str(OPS[op](a, b))
        lines = response.split("\n")
        assert lines[0] == f"Problem: {expr}" and lines[-1] == f"Answer: {gt}"
        assert f"Result: {expr}={gt}" in lines
        assert len(response) >= 64  # one token per byte with the tiny model's tokenizer
        assert len(response) <= max_solution_chars(task)
        assert is_correct(response, gt) and compute_score(response, gt)["score"] == 1.0
        wrong = solution_text(expr, int(gt) + 1, "worked")
        assert compute_score(wrong, gt)["score"] == -1.0
    short = make_sft_pairs(3, seed=5, task=ArithmeticTask(digits=1))
    assert [r for _, r in short] == [
        solution_text(m[0]["content"][8:-1], int(r.split()[-1])) for m, r in short
    ]


def test_solution_format_is_validated():
    with pytest.raises(ValueError, match="solution"):
        ArithmeticTask(solution="verbose")
    with pytest.raises(ValueError, match="solution"):
        solution_text("1+2", 3, "verbose")
    assert max_solution_chars(ArithmeticTask(digits=2)) < 32


def test_solution_format_config_key_and_tiny_model_cache_key():
    from fipo_trainer.data.tiny_model import TinyModelSettings
    from fipo_trainer.trainer.config import ConfigError
    from fipo_trainer.trainer.config.sections import SyntheticDataConfig

    SyntheticDataConfig(solution_format="worked").validate()
    with pytest.raises(ConfigError, match="solution_format"):
        SyntheticDataConfig(solution_format="verbose").validate()
    short, worked = TinyModelSettings(), TinyModelSettings(task_solution="worked")
    assert short.key() != worked.key()  # a worked-format warm start is its own build
    legacy = {k: v for k, v in dataclasses.asdict(short).items() if k != "task_solution"}
    blob = json.dumps(legacy, sort_keys=True).encode()
    assert short.key() == hashlib.sha256(blob).hexdigest()[:16]  # older cache keys still hold
    with pytest.raises(ValueError, match="solution"):
        TinyModelSettings(task_solution="verbose").validate()
