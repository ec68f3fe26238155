"""Reading data files and validating their rows (verl or raw schema) into prompt fields.

Why checked row by row: a malformed row deep inside a 17k-row file otherwise surfaces as a
shape error or a silent zero reward hours into a run. Every problem is reported with the
file, the row index and the field. This module knows nothing of tokenizers: the dataset
(:mod:`fipo_trainer.data.dataset`), ``fipo-data prepare`` and ``fipo-eval`` share it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fipo_trainer.data.config import DataConfig

__all__ = [
    "PREVIEW_ROWS",
    "SKIP_HINT",
    "SUFFIXES",
    "DataError",
    "check_columns",
    "columns_of",
    "detect_schema",
    "holds_rows",
    "parse_row",
    "preview_problems",
    "read_preview",
    "read_records",
]

SUFFIXES = (".parquet", ".jsonl", ".json")
#: Rows a dry run checks per file (reading a whole 17k-row file is training's job).
PREVIEW_ROWS = 8
#: The fix offered with every bad row (training raises, or skips when this is set).
SKIP_HINT = "set data.skip_bad_rows=true to skip such rows"


class DataError(ValueError):
    """A data file or row that cannot be used (message names file, row and field)."""


def _require_file(path: Path) -> None:
    """A directory is no data file, and says so (not "not found": it exists)."""
    if path.is_dir():
        raise DataError(
            f"{path} is a directory, not a data file: pass the {'/'.join(SUFFIXES)} files "
            "in it (a list of paths)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")


def _not_utf8(path: Path, raw: bytes, err: UnicodeDecodeError, line: int = 1) -> DataError:
    """The decode error of ``raw`` (a line, or a whole file: line counted here) as a
    `DataError` naming file, line and byte; Python's own names neither file nor line."""
    line += raw.count(b"\n", 0, err.start)
    column = err.start - raw.rfind(b"\n", 0, err.start)
    return DataError(
        f"{path} line {line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column}): "
        "data files must be UTF-8; re-encode the file (e.g. iconv -f latin1 -t utf-8)"
    )


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.parquet``, ``.jsonl`` or ``.json`` (list of objects) file as dicts."""
    path = Path(path)
    _require_file(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet ({e})") from e
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        raw = path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _not_utf8(path, raw, e) from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from e
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: a .json data file must hold a list of objects")
        return data
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {SUFFIXES}")


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:  # decoded line by line: a bad byte is named with its line
        for i, raw in enumerate(f):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, raw, e, i + 1) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i + 1}: invalid JSON ({e})") from e
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {i + 1}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def read_preview(
    path: str | Path, rows: int = PREVIEW_ROWS
) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and the first ``rows`` rows, without reading the whole file (dry runs).

    Parquet columns come from the file's schema; JSON columns are the keys of the rows read.
    Errors are `read_records`' own, so a dry run reports what training would.
    """
    path = Path(path)
    _require_file(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            columns = list(pf.schema_arrow.names)
            batch = next(pf.iter_batches(batch_size=rows), None) if pf.metadata.num_rows else None
            records = batch.to_pylist()[:rows] if batch is not None else []
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet ({e})") from e
        return columns, records
    records = _read_jsonl(path, rows) if path.suffix == ".jsonl" else read_records(path)[:rows]
    return columns_of(records), records


def holds_rows(path: str | Path) -> bool:
    """Whether a file holds at least one row (a split of empty files trains on nothing).
    True when it cannot be read: `preview_problems` reports that, with its reason."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return bool(pq.ParquetFile(path).metadata.num_rows)
        return bool(read_preview(path, 1)[1])
    except Exception:  # unreadable: not this check's to report
        return True


def columns_of(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every key any row has (a file's columns), in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    return list(seen)


def _required(schema: str, cfg: DataConfig) -> dict[str, str]:
    if schema == "verl":
        return {
            cfg.prompt_key: "the chat messages of each prompt (data.prompt_key)",
            "data_source": "the dataset name that routes the grader",
            "reward_model": "each prompt's {'ground_truth': ...} for the reward",
        }
    if schema == "raw":
        return {
            cfg.problem_key: "the problem text (data.problem_key)",
            cfg.answer_key: "the ground-truth answer (data.answer_key)",
        }
    raise ValueError(f"unknown schema {schema!r}")


def check_columns(columns: Sequence[str], schema: str, cfg: DataConfig, path: Path) -> None:
    """Raise one `DataError` per file for missing columns (not one per row: every row of such
    a file is bad for the same reason)."""
    have = set(columns)
    missing = {k: v for k, v in _required(schema, cfg).items() if k not in have}
    if missing:
        what = "; ".join(f"{k!r}: {v}" for k, v in missing.items())
        raise DataError(
            f"{path}: missing column(s) {list(missing)} for the {schema} schema ({what}); the "
            f"file has columns {sorted(have)}: add the column(s) to the file or set "
            "data.schema / data.prompt_key / data.problem_key / data.answer_key to match it"
        )


def preview_problems(
    path: str | Path, cfg: DataConfig, rows: int = PREVIEW_ROWS
) -> tuple[list[str], list[str]]:
    """``(file problems, bad-row problems)`` of a file's columns and first rows, in the
    messages training gives (so ``--dry-run`` catches a broken file before anything starts)."""
    path = Path(path)
    try:
        columns, records = read_preview(path, rows)
        if not records:  # training warns and goes on ("holds no rows")
            return [], []
        schema = detect_schema(records, cfg, path)
        check_columns(columns, schema, cfg, path)
    except (DataError, FileNotFoundError, OSError) as e:
        return [str(e)], []
    bad = []
    for i, record in enumerate(records):
        try:
            parse_row(record, schema, cfg, f"{path} row {i}")
        except DataError as e:
            bad.append(str(e))
    return [], bad


def detect_schema(records: Sequence[dict[str, Any]], cfg: DataConfig, path: Path) -> str:
    """``verl`` if the prompt column exists, ``raw`` if the problem column does."""
    if cfg.schema != "auto":
        return cfg.schema
    keys = set(records[0]) if records else set()
    if cfg.prompt_key in keys:
        return "verl"
    if cfg.problem_key in keys:
        return "raw"
    raise DataError(
        f"{path}: cannot tell the schema from columns {sorted(keys)}: expected "
        f"{cfg.prompt_key!r} (verl schema) or {cfg.problem_key!r} (raw schema); set "
        "data.prompt_key / data.problem_key or data.schema"
    )


def _ground_truth(value: Any, where: str, name: str) -> str:
    if value is None:
        raise DataError(f"{where}: field {name!r} is missing (every prompt needs a ground truth)")
    if isinstance(value, bool):
        raise DataError(f"{where}: field {name!r} must be a string, got bool {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where}: field {name!r} is {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(
            f"{where}: field {name!r} must be a non-empty list of chat messages "
            f"[{{'role': ..., 'content': ...}}], got {type(value).__name__}"
        )
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(
                f"{where}: {name}[{j}] must be a dict with 'role' and 'content', got {type(m).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise DataError(
                    f"{where}: {name}[{j}].{key} must be a string, got {type(m.get(key)).__name__}"
                )
        if not m["content"].strip():
            raise DataError(
                f"{where}: column {name!r}: {name}[{j}].content ({m['role']}) is empty "
                f"({m['content']!r}), so the model would train on a blank prompt: fix the row "
                "in the file or drop it"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _extra_info(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(
            f"{where}: field 'extra_info' must be a dict or null, got {type(value).__name__}"
        )
    return dict(value)


def parse_row(record: dict[str, Any], schema: str, cfg: DataConfig, where: str) -> dict[str, Any]:
    """Validate one record into ``raw_prompt``/``data_source``/``ground_truth``/``extra_info``."""
    if schema == "verl":
        if cfg.prompt_key not in record:
            raise DataError(f"{where}: field {cfg.prompt_key!r} is missing")
        messages = _messages(record[cfg.prompt_key], where, cfg.prompt_key)
        source = record.get("data_source")
        if not isinstance(source, str) or not source:
            raise DataError(
                f"{where}: field 'data_source' must be a non-empty string, got {source!r}"
            )
        rm = record.get("reward_model")
        if not isinstance(rm, dict):
            raise DataError(
                f"{where}: field 'reward_model' must be a dict with 'ground_truth', got {type(rm).__name__}"
            )
        truth = _ground_truth(rm.get("ground_truth"), where, "reward_model.ground_truth")
        extra = _extra_info(record.get("extra_info"), where)
    elif schema == "raw":
        problem = record.get(cfg.problem_key)
        if not isinstance(problem, str) or not problem.strip():
            raise DataError(
                f"{where}: field {cfg.problem_key!r} must be a non-empty string, got {problem!r}"
            )
        truth = _ground_truth(record.get(cfg.answer_key), where, cfg.answer_key)
        messages = [{"role": "user", "content": cfg.prompt_template.format(problem=problem)}]
        if cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        source = (
            record.get("data_source")
            if isinstance(record.get("data_source"), str)
            else cfg.raw_data_source
        )
        extra = _extra_info(record.get("extra_info"), where)
        extra.setdefault("problem", problem)
    else:
        raise ValueError(f"unknown schema {schema!r}")
    return {
        "raw_prompt": messages,
        "data_source": source,
        "ground_truth": truth,
        "extra_info": extra,
    }
