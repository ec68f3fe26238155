"""RewardConfig validation and routing, overlong shaping, custom reward functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from fipo_trainer.rewards import RewardConfig, load_custom_function, overlong_penalty
from fipo_trainer.rewards.custom import make_caller, normalize_result
from fipo_trainer.rewards.overlong import overlong_penalties


def test_default_routing() -> None:
    cfg = RewardConfig()
    assert cfg.grader_for("math_dapo") == "dapo"
    assert cfg.grader_for("aime24") == "dapo"
    assert cfg.grader_for("AIME2025") == "dapo"  # case-insensitive pattern
    assert cfg.grader_for("math500") == "math_verify"
    assert cfg.grader_for("gsm8k") == "math_verify"  # unknown -> default grader
    assert cfg.correct_score == 1.0 and cfg.failure_score == -1.0
    assert cfg.timeout_s == 10.0


def test_custom_routing_and_formats() -> None:
    cfg = RewardConfig(routes={"gsm*": "dapo", "gsm8k_hard": "math_verify"}, default_grader="dapo")
    assert cfg.grader_for("gsm8k_hard") == "math_verify"  # exact names beat patterns
    assert cfg.grader_for("gsm8k") == "dapo"
    assert cfg.grader_for("math500") == "dapo"
    assert RewardConfig(score_format="binary").failure_score == 0.0
    custom = RewardConfig(custom_function="my_reward.py:score")
    assert custom.grader_for("math_dapo") == "custom"
    assert custom.used_graders == {"custom"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"routes": {"x": "regex"}}, r"reward.routes\['x'\]"),
        ({"default_grader": "sympy"}, "reward.default_grader"),
        ({"custom_function": "file.py"}, "path/to/file.py:function_name"),
        ({"score_format": "0-10"}, "reward.score_format"),
        ({"timeout_s": 0}, "reward.timeout_s"),
        ({"num_workers": 0}, "reward.num_workers"),
        (
            {
                "overlong_buffer_enable": True,
                "max_response_length": 100,
                "overlong_buffer_len": 200,
            },
            "reward.overlong_buffer_len",
        ),
    ],
)
def test_invalid_config_names_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_max_response_length_may_be_filled_in_later() -> None:
    cfg = RewardConfig(overlong_buffer_enable=True)  # a trainer sets max_response_length later
    with pytest.raises(ValueError, match=r"reward\.max_response_length"):
        cfg.validate()
    cfg.max_response_length = 20480
    cfg.validate()


def test_overlong_penalty_matches_dapo_schedule() -> None:
    # DAPO: L_max = 20480, buffer 4096: 0 up to 16384 tokens, then linear down to -1 at 20480.
    def pen(n: int) -> float:
        return overlong_penalty(n, 20480, 4096, 1.0)

    assert pen(0) == 0.0 and pen(16384) == 0.0
    assert pen(16384 + 1024) == pytest.approx(-0.25)
    assert pen(18432) == pytest.approx(-0.5)
    assert pen(20480) == pytest.approx(-1.0)
    assert overlong_penalty(20480, 20480, 4096, 0.5) == pytest.approx(-0.5)
    assert overlong_penalties([10, 90, 100], 100, 20, 1.0) == pytest.approx([0.0, -0.5, -1.0])
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(10, 100, 0)


def _write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "my_reward.py"
    path.write_text(source)
    return path


def test_load_custom_function_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_custom_function(f"{tmp_path}/missing.py:score")
    path = _write(tmp_path, "def score(response, ground_truth):\n    return 1.0\nVALUE = 3\n")
    with pytest.raises(AttributeError, match=r"no function 'grade'.*\['score'\]"):
        load_custom_function(f"{path}:grade")
    with pytest.raises(TypeError, match="not callable"):
        load_custom_function(f"{path}:VALUE")
    with pytest.raises(ValueError, match="function_name"):
        load_custom_function(str(path))
    assert load_custom_function(f"{path}:score")("x", "y") == 1.0


def test_caller_passes_optional_arguments(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "def two(a, b):\n    return (a, b)\n"
        "def with_source(response, ground_truth, data_source=None):\n"
        "    return (response, ground_truth, data_source)\n"
        "def verl_style(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return (data_source, solution_str, ground_truth, extra_info)\n"
        "def kw(response, ground_truth, **kwargs):\n    return sorted(kwargs)\n",
    )
    call = {
        name: make_caller(load_custom_function(f"{path}:{name}"))
        for name in ("two", "with_source", "verl_style", "kw")
    }
    args = ("resp", "gt", "ds", {"k": 1})
    assert call["two"](*args) == ("resp", "gt")
    assert call["with_source"](*args) == ("resp", "gt", "ds")
    assert call["verl_style"](*args) == ("ds", "resp", "gt", {"k": 1})
    assert call["kw"](*args) == ["data_source", "extra_info"]


def test_normalize_result() -> None:
    assert normalize_result(1) == (1.0, True, "")
    assert normalize_result(0.0) == (0.0, False, "")
    assert normalize_result(True) == (1.0, True, "")
    assert normalize_result({"score": -1, "pred": 7}) == (-1.0, False, "7")
    assert normalize_result({"score": 0.0, "acc": True}) == (0.0, True, "")
    for bad in ("1.0", None, {"acc": True}, float("nan")):
        with pytest.raises((TypeError, ValueError)):
            normalize_result(bad)
