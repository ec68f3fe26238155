"""Per-sample rollout dumps (prompt, response, score, acc, ...) as jsonl, one file per step.

Why: reading actual responses is the fastest way to see reward hacking, format collapse or
truncation that aggregate metrics hide. One file per step keeps resumed runs clean (a
re-dumped step replaces its file) and lets ``jq``/pandas read any step on its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fipo_trainer.fsutil import atomic_file

__all__ = ["REQUIRED_FIELDS", "dump_rollouts", "jsonable", "records_from_batch", "rollout_path"]

#: Fields every record carries (missing ones are written as null).
REQUIRED_FIELDS = ("prompt", "response", "score", "acc", "data_source", "ground_truth")


def rollout_path(run_dir: str | Path, step: int) -> Path:
    """``run_dir/rollouts/step_{step:06d}.jsonl``."""
    return Path(run_dir) / "rollouts" / f"step_{int(step):06d}.jsonl"


def jsonable(value: Any) -> Any:
    """Plain-JSON form of numpy/torch scalars and arrays; non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays/scalars, torch tensors
    if callable(tolist):
        return jsonable(tolist())
    return str(value)


def records_from_batch(batch: Any) -> list[dict[str, Any]]:
    """One record per response of a graded rollout batch (fields in ``data/schema.py``)."""
    get = batch.non_tensors.get
    raw = get("raw_prompt")
    return [
        {
            "uid": batch["uid"][i],
            "data_source": batch["data_source"][i],
            "prompt": raw[i] if raw is not None else None,
            "response": batch["response_text"][i],
            "ground_truth": batch["ground_truth"][i],
            "score": float(batch["score"][i]),
            "acc": bool(batch["acc"][i]),
            "pred": batch["pred"][i],
        }
        for i in range(len(batch))
    ]


def dump_rollouts(run_dir: str | Path, step: int, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``records`` to :func:`rollout_path` (atomically; an existing file is replaced).

    Each line holds the :data:`REQUIRED_FIELDS` (null when a record lacks one) first, then
    any other keys of the record (``uid``, ``pred``, ...) and ``step``.
    """
    if step < 0:
        raise ValueError(f"dump_rollouts: step must be >= 0, got {step}")
    path = rollout_path(run_dir, step)
    with atomic_file(path) as f:
        for record in records:
            row = {key: record.get(key) for key in REQUIRED_FIELDS}
            row.update(record)
            row["step"] = int(step)
            f.write(json.dumps(jsonable(row), ensure_ascii=False) + "\n")
    return path
