"""Load a user reward function from ``path/to/file.py:function_name`` and call it uniformly.

The function is called with the response and the ground truth, plus ``data_source`` and
``extra_info`` when its signature accepts them. verl-style signatures
(``compute_score(data_source, solution_str, ground_truth, extra_info=None)``) work too, because
arguments are passed by name whenever every required parameter has a known name.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fipo_trainer.plugins import import_file

__all__ = ["load_custom_function", "make_caller", "normalize_result", "split_spec"]

_RESPONSE_NAMES = ("response", "solution_str", "solution", "completion")
_KNOWN = {*_RESPONSE_NAMES, "ground_truth", "data_source", "extra_info"}


def split_spec(spec: str) -> tuple[Path, str]:
    """'path/to/file.py:function_name' -> (absolute path, function name)."""
    path_str, sep, func_name = str(spec).rpartition(":")
    if not sep or not path_str or not func_name:
        raise ValueError(
            f"reward.custom_function = {spec!r} must look like 'path/to/file.py:function_name'"
        )
    return Path(path_str).expanduser().resolve(), func_name


def load_custom_function(spec: str) -> Callable[..., Any]:
    """Import the file and return its function; clear errors when either is missing."""
    path, func_name = split_spec(spec)
    module = import_file(path, f"reward.custom_function ({spec!r})")
    func = getattr(module, func_name, None)
    if func is None:
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise AttributeError(
            f"reward.custom_function: {str(path)!r} has no function {func_name!r}; "
            f"callables there: {names}"
        )
    if not callable(func):
        raise TypeError(f"reward.custom_function: {func_name!r} in {str(path)!r} is not callable")
    return func


def make_caller(func: Callable[..., Any]) -> Callable[[str, str, str, Any], Any]:
    """Wrap ``func`` as ``call(response, ground_truth, data_source, extra_info)``."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins without a signature: plain positional call
        return lambda response, ground_truth, data_source, extra_info: func(response, ground_truth)

    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [p for p in params.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p for p in named if p.default is p.empty]
    by_name = all(p.name in _KNOWN and p.kind is not p.POSITIONAL_ONLY for p in required) and any(
        p.name in _RESPONSE_NAMES for p in named
    )
    if by_name:
        response_name = next(p.name for p in named if p.name in _RESPONSE_NAMES)

        def call_by_name(response, ground_truth, data_source, extra_info):
            values = {
                response_name: response,
                "ground_truth": ground_truth,
                "data_source": data_source,
                "extra_info": extra_info,
            }
            return func(**{k: v for k, v in values.items() if k in params or var_kw})

        return call_by_name

    extras = [n for n in ("data_source", "extra_info") if n in params or var_kw]

    def call_positional(response, ground_truth, data_source, extra_info):
        values = {"data_source": data_source, "extra_info": extra_info}
        return func(response, ground_truth, **{k: values[k] for k in extras})

    return call_positional


def normalize_result(value: Any) -> tuple[float, bool, str]:
    """float | bool | int | {"score", "acc"?, "pred"?} -> (score, acc, pred).

    ``acc`` defaults to ``score > 0`` (right for both +1/-1 and 1/0 conventions).
    """
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"custom reward returned a dict without 'score': keys {sorted(value)}")
        score = _finite(value["score"])
        acc = bool(value["acc"]) if "acc" in value else score > 0
        pred = value.get("pred", "")
        return score, acc, "" if pred is None else str(pred)
    if isinstance(value, (bool, int, float)) or hasattr(value, "__float__"):
        score = _finite(value)
        return score, score > 0, ""
    raise TypeError(
        f"custom reward must return a number or a dict with 'score', got {type(value).__name__}"
    )


def _finite(value: Any) -> float:
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"custom reward returned a non-finite score {score}")
    return score
