"""``fipo-data``: write the recipe datasets (and the built-in task / tiny model) to disk.

Why a command: recipes name files under ``data.data_dir`` (``dapo-math-17k.parquet``,
``aime-2024.parquet``, ...). This converts the public datasets into that verl layout, with
the DAPO instruction in the prompt, either from local files (offline machines) or from the
Hugging Face hub. DAPO-Math-17k is published with every prompt repeated, so rows are
de-duplicated on (prompt, ground truth).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fipo_trainer.data.config import DataConfig
from fipo_trainer.data.records import DataError, parse_row, read_records
from fipo_trainer.fsutil import atomic_file

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
PROBLEM_COLUMNS = ("problem", "Problem", "question", "Question")
ANSWER_COLUMNS = ("answer", "Answer", "solution_answer")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a recipe dataset comes from and what its rows are labelled."""

    name: str  # also the output file stem
    data_source: str  # routes the grader (fipo_trainer.rewards)
    split: str
    hub_repo: str
    hub_configs: tuple[str | None, ...]
    hub_split: str
    integer_answers: bool = False  # AIME: "023" -> "23"


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "dapo-math-17k",
            "math_dapo",
            "train",
            "BytedTsinghua-SIA/DAPO-Math-17k",
            (None,),
            "train",
        ),
        DatasetSpec("aime-2024", "aime24", "test", "Maxwell-Jia/AIME_2024", (None,), "train", True),
        DatasetSpec(
            "aime-2025",
            "aime25",
            "test",
            "opencompass/AIME2025",
            ("AIME2025-I", "AIME2025-II"),
            "test",
            True,
        ),
        DatasetSpec("math-500", "math500", "test", "HuggingFaceH4/MATH-500", (None,), "test"),
    )
}


# ---------------------------------------------------------------------------- conversion
def dapo_prompt(problem: str) -> str:
    """The DAPO instruction around a bare problem (what the reward rule expects)."""
    return f"{DAPO_PREFIX}{problem.strip()}{DAPO_SUFFIX}"


def _column(record: dict[str, Any], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in record), None)


def to_verl_rows(
    records: Sequence[dict[str, Any]], spec: DatasetSpec, origin: str
) -> list[dict[str, Any]]:
    """verl-schema rows from verl rows (kept) or raw problem/answer rows (DAPO-templated).

    Raises ``DataError`` naming ``origin``, the row and the field for unusable rows.
    """
    out = []
    for i, record in enumerate(records):
        where = f"{origin} row {i}"
        if "prompt" in record:
            row = parse_row(record, "verl", DataConfig(), where)
            extra = row["extra_info"]
            messages = row["raw_prompt"]
            source = row["data_source"]
        else:
            pcol, acol = _column(record, PROBLEM_COLUMNS), _column(record, ANSWER_COLUMNS)
            if pcol is None or acol is None:
                raise DataError(
                    f"{where}: expected a 'prompt' column (verl schema) or problem/answer columns "
                    f"({PROBLEM_COLUMNS} / {ANSWER_COLUMNS}); got {sorted(record)}"
                )
            cfg = DataConfig(problem_key=pcol, answer_key=acol)
            row = parse_row(record, "raw", cfg, where)
            problem = row["extra_info"].pop("problem")
            messages = [{"role": "user", "content": dapo_prompt(problem)}]
            kept = {
                k: v
                for k, v in record.items()
                if k not in (pcol, acol, "solution", "Solution", "extra_info", "data_source")
                and isinstance(v, (str, int, float, bool))
            }
            extra = {**kept, "problem": problem.strip(), **row["extra_info"]}
            source = spec.data_source
        truth = row["ground_truth"].strip()
        if spec.integer_answers and truth.lstrip("-").isdigit():
            truth = str(int(truth))
        out.append(
            {
                "data_source": source,
                "prompt": messages,
                "ability": record.get("ability") or "MATH",
                "reward_model": {"style": "rule", "ground_truth": truth},
                "extra_info": {**extra, "split": extra.get("split", spec.split)},
            }
        )
    return out


def dedupe(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """First occurrence of each (prompt messages, ground truth); re-indexes ``extra_info.index``."""
    seen, out = set(), []
    for row in rows:
        key = (
            tuple((m["role"], m["content"]) for m in row["prompt"]),
            row["reward_model"]["ground_truth"],
        )
        if key in seen:
            continue
        seen.add(key)
        out.append({**row, "extra_info": {**row["extra_info"], "index": len(out)}})
    return out


def write_parquet(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_file(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(list(rows)), f)
    return path


# ---------------------------------------------------------------------------- sources
def load_local(spec: DatasetSpec, path: Path) -> list[dict[str, Any]]:
    return to_verl_rows(read_records(path), spec, str(path))


def load_hub(spec: DatasetSpec) -> list[dict[str, Any]]:
    """Download with ``datasets`` (network needed; not exercised by the offline tests)."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise RuntimeError(
            "--from-hub needs the `datasets` package (pip install datasets); offline, pass "
            "local files with --local-dir DIR or --<name> PATH"
        ) from e
    records: list[dict[str, Any]] = []
    for config in spec.hub_configs:
        try:
            ds = load_dataset(spec.hub_repo, config, split=spec.hub_split)
        except Exception as e:  # connection, auth and missing-repo errors all land here
            raise RuntimeError(
                f"could not load {spec.hub_repo}{f' ({config})' if config else ''} from the Hugging "
                f"Face hub: {e}\nOffline? Pass local files with --local-dir DIR or --{spec.name} PATH"
            ) from e
        records.extend(ds.to_list())
    return to_verl_rows(records, spec, f"hf://{spec.hub_repo}")


def prepare(
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    local_dir: str | Path | None = None,
    paths: dict[str, str | Path] | None = None,
    from_hub: bool = False,
    keep_duplicates: bool = False,
) -> dict[str, dict[str, Any]]:
    """Write each requested dataset to ``out_dir/<name>.parquet``; returns counts per name."""
    names = list(names or DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; choose from {list(DATASETS)}")
    paths = {k: Path(v) for k, v in (paths or {}).items() if v}
    if not (local_dir or paths or from_hub):
        raise ValueError(
            "say where the data comes from: --local-dir DIR (e.g. ../shared/data), --<name> PATH or --from-hub"
        )
    report = {}
    for name in names:
        spec = DATASETS[name]
        if name in paths:
            rows, origin = load_local(spec, paths[name]), str(paths[name])
        elif local_dir is not None and (Path(local_dir) / f"{name}.parquet").is_file():
            origin = str(Path(local_dir) / f"{name}.parquet")
            rows = load_local(spec, Path(origin))
        elif from_hub:
            rows, origin = load_hub(spec), f"hf://{spec.hub_repo}"
        else:
            raise FileNotFoundError(
                f"no source for {name}: {Path(local_dir or '.') / f'{name}.parquet'} does not exist; "
                f"pass --{name} PATH, fix --local-dir, or use --from-hub"
            )
        unique = list(rows) if keep_duplicates else dedupe(rows)
        if not unique:  # a 0-row file would only fail later, in training or evaluation
            raise ValueError(f"{origin} holds no rows; nothing to write for {name} (check the file)")
        try:
            path = write_parquet(unique, Path(out_dir) / f"{name}.parquet")
        except OSError as e:  # --out-dir a file, read-only, disk full: no traceback
            raise RuntimeError(
                f"cannot write {name}.parquet into --out-dir {out_dir}: {e}; pass a writable "
                "directory (or a path where one can be created)"
            ) from e
        report[name] = {
            "rows": len(unique),
            "duplicates": len(rows) - len(unique),
            "path": str(path),
            "source": origin,
        }
    return report


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fipo-data", description="Write datasets and the built-in tiny model to disk."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pr = sub.add_parser(
        "prepare", help="DAPO-Math-17k, AIME 2024/2025, MATH-500 -> <out-dir>/<name>.parquet"
    )
    pr.add_argument("--out-dir", default="data", help="the project's data dir (data.data_dir)")
    pr.add_argument(
        "--local-dir",
        default=None,
        help="directory holding <name>.parquet files (e.g. ../shared/data)",
    )
    pr.add_argument(
        "--from-hub",
        action="store_true",
        help="download missing datasets from the Hugging Face hub",
    )
    pr.add_argument(
        "--keep-duplicates", action="store_true", help="do not drop repeated (prompt, answer) rows"
    )
    pr.add_argument(
        "--only", nargs="+", choices=list(DATASETS), default=None, help="subset of datasets"
    )
    for name in DATASETS:
        pr.add_argument(
            f"--{name}", default=None, metavar="PATH", help=f"local file for {name} (parquet/jsonl)"
        )

    ar = sub.add_parser(
        "arithmetic", help="write the synthetic arithmetic task (builtin:arithmetic) as files"
    )
    ar.add_argument("--out-dir", default="data/arithmetic")
    ar.add_argument("--num-train", type=int, default=2000)
    ar.add_argument("--num-val", type=int, default=64)
    ar.add_argument("--digits", type=int, default=2)
    ar.add_argument("--seed", type=int, default=0)
    ar.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")

    tm = sub.add_parser(
        "tiny-model", help="build (or reuse) the built-in tiny model; print its path"
    )
    tm.add_argument("--out-dir", default=None, help="default: the cache directory")
    tm.add_argument("--hidden-size", type=int, default=64)
    tm.add_argument("--num-layers", type=int, default=2)
    tm.add_argument("--warm-start-steps", type=int, default=0)
    tm.add_argument("--digits", type=int, default=2)
    tm.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fipo-data``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "prepare":
        paths = {name: getattr(args, name.replace("-", "_")) for name in DATASETS}
        try:
            report = prepare(
                args.out_dir,
                names=args.only,
                local_dir=args.local_dir,
                paths=paths,
                from_hub=args.from_hub,
                keep_duplicates=args.keep_duplicates,
            )
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"fipo-data prepare: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # an unreadable input (a directory, no permission)
            print(f"fipo-data prepare: cannot read an input: {e}", file=sys.stderr)
            return 2
        for name, r in report.items():
            dup = f", {r['duplicates']} duplicates removed" if r["duplicates"] else ""
            print(f"{name}: {r['rows']} rows{dup} <- {r['source']} -> {r['path']}")
        return 0
    if args.command == "arithmetic":
        from fipo_trainer.data.synthetic import ArithmeticTask, make_rows, write_rows

        try:
            task = ArithmeticTask(digits=args.digits)
        except ValueError as e:  # a usage error: argparse's one line, not a traceback
            parser.error(f"--digits: {e}")
        for flag, count in (("--num-train", args.num_train), ("--num-val", args.num_val)):
            if count < 1:  # a 0-row split is no dataset: fail here, not in training
                parser.error(f"{flag} must be >= 1, got {count}")
        for split, count in (("train", args.num_train), ("val", args.num_val)):
            rows = make_rows(count, seed=args.seed, task=task, split=split)
            try:
                path = write_rows(rows, Path(args.out_dir) / f"{split}.{args.format}")
            except OSError as e:
                print(f"fipo-data arithmetic: cannot write into --out-dir {args.out_dir}: {e}; "
                      "pass a writable directory", file=sys.stderr)
                return 2
            print(f"{split}: {len(rows)} rows -> {path}")
        return 0
    from fipo_trainer.data.tiny_model import TinyModelSettings, build_tiny_model

    settings = {
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "warm_start_steps": args.warm_start_steps,
        "task_digits": args.digits,
        "seed": args.seed,
    }
    try:  # checked before the build starts: a bad flag is argparse's one line
        TinyModelSettings(**settings).validate()
    except ValueError as e:
        flag = next((f for name, f in _TINY_FLAGS if name in str(e)), "tiny-model")
        parser.error(f"{flag}: {e}")
    print(build_tiny_model(args.out_dir, **settings))
    return 0


# The setting each `TinyModelSettings.validate` message names, and the flag that sets it.
_TINY_FLAGS = (
    ("warm_start_steps", "--warm-start-steps"),
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("digits", "--digits"),
)


if __name__ == "__main__":
    sys.exit(main())
