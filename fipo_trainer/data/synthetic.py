"""Seeded synthetic verifiable task: multi-digit arithmetic graded via an "Answer:" line.

Why: tests and the quickstart need a task that a tiny model can learn in seconds on CPU and
that the DAPO rule grades exactly (the answer is a plain integer on a final ``Answer: N``
line). Rows use the verl schema so they flow through the same loader as real datasets.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fipo_trainer.fsutil import atomic_file

DATA_SOURCE = "arithmetic"
SUPPORTED_OPS = ("+", "-", "*")
#: Response formats: ``short`` = one worked line; ``worked`` = the steps written out (>= 64
#: characters, so >= 64 tokens with the tiny model's byte tokenizer: a rollout-heavy task).
SOLUTION_FORMATS = ("short", "worked")
_OP_NAMES = {"+": "add", "-": "subtract", "*": "multiply"}
DEFAULT_PROMPT_TEMPLATE = "What is {expr}?"
_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


@dataclass(frozen=True)
class ArithmeticTask:
    """Settings of the arithmetic task.

    Each operand has 1..``digits`` digits (length drawn uniformly, so short, easy problems
    give a freshly warm-started model partial accuracy); ``*`` uses a 1-digit right operand.
    ``solution`` only changes the target response of the warm start (see `solution_text`).
    """

    digits: int = 2
    ops: tuple[str, ...] = ("+", "-")
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    data_source: str = DATA_SOURCE
    solution: str = "short"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 9:
            raise ValueError(f"ArithmeticTask.digits must be in 1..9, got {self.digits}")
        if not self.ops or any(op not in SUPPORTED_OPS for op in self.ops):
            raise ValueError(
                f"ArithmeticTask.ops must be a non-empty subset of {SUPPORTED_OPS}, got {self.ops}"
            )
        if "{expr}" not in self.prompt_template:
            raise ValueError("ArithmeticTask.prompt_template must contain '{expr}'")
        if self.solution not in SOLUTION_FORMATS:
            raise ValueError(
                f"ArithmeticTask.solution must be one of {SOLUTION_FORMATS}, got {self.solution!r}"
            )


def sample_problem(rng: random.Random, task: ArithmeticTask) -> tuple[str, int]:
    """Draw one ``(expression, result)``; subtraction keeps results non-negative."""
    op = rng.choice(task.ops)
    a = _operand(rng, rng.randint(1, task.digits))
    b = rng.randint(0, 9) if op == "*" else _operand(rng, rng.randint(1, task.digits))
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}", result


def _operand(rng: random.Random, digits: int) -> int:
    """A number with exactly ``digits`` digits (0 counts as one digit)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def solution_text(expr: str, result: int, solution: str = "short") -> str:
    """The target response: the worked line (or, ``worked``, the steps) then ``Answer: N``.

    The ``worked`` steps only copy and restate numbers (learnable by a 2-layer model) and end
    with the same final ``Answer:`` line, so the DAPO rule grades both formats alike.
    """
    if solution == "short":
        return f"{expr}={result}\nAnswer: {result}"
    if solution != "worked":
        raise ValueError(f"solution must be one of {SOLUTION_FORMATS}, got {solution!r}")
    op = next(o for o in SUPPORTED_OPS if o in expr)
    a, b = expr.split(op)
    check = {"+": f"{result}-{b}={a}", "-": f"{result}+{b}={a}", "*": f"{b}*{a}={result}"}[op]
    return (
        f"Problem: {expr}\nFirst number: {a}\nSecond number: {b}\nOperation: {_OP_NAMES[op]}\n"
        f"Result: {expr}={result}\nCheck: {check}\nAnswer: {result}"
    )


def max_solution_chars(task: ArithmeticTask) -> int:
    """An upper bound on the target response's length (a generation budget for evaluation)."""
    worst = 10 ** (task.digits + 1)  # covers any operand and any result of the task
    return max(len(solution_text(f"{worst}{op}{worst}", worst, task.solution)) for op in task.ops)


def make_rows(
    n: int, *, seed: int = 0, task: ArithmeticTask | None = None, split: str = "train"
) -> list[dict[str, Any]]:
    """``n`` verl-schema rows generated deterministically from ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    task = task or ArithmeticTask()
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for i in range(n):
        expr, result = sample_problem(rng, task)
        rows.append(
            {
                "data_source": task.data_source,
                "prompt": [{"role": "user", "content": task.prompt_template.format(expr=expr)}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": str(result)},
                "extra_info": {"index": i, "split": split, "expr": expr},
            }
        )
    return rows


def make_sft_pairs(
    n: int, *, seed: int = 0, task: ArithmeticTask | None = None
) -> list[tuple[list[dict[str, str]], str]]:
    """``n`` (chat messages, target response) pairs for the supervised warm start."""
    task = task or ArithmeticTask()
    rows = make_rows(n, seed=seed, task=task, split="sft")
    return [
        (
            row["prompt"],
            solution_text(
                row["extra_info"]["expr"], int(row["reward_model"]["ground_truth"]), task.solution
            ),
        )
        for row in rows
    ]


def extract_answer(response: str) -> str | None:
    """The text after the last ``Answer:`` (DAPO looks at the last 300 characters)."""
    matches = _ANSWER_RE.findall(response[-300:])
    return matches[-1].strip() if matches else None


def is_correct(response: str, ground_truth: str) -> bool:
    """Exact string check of the final Answer line (enough for integer answers)."""
    return extract_answer(response) == str(ground_truth).strip()


def write_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as ``.parquet`` or ``.jsonl`` (chosen by suffix), atomically."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        with atomic_file(path, "wb") as f:
            pd.DataFrame(list(rows)).to_parquet(f, index=False)
    elif path.suffix in (".jsonl", ".json"):
        with atomic_file(path) as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        raise ValueError(f"unsupported suffix {path.suffix!r} for {path}: use .parquet or .jsonl")
    return path
