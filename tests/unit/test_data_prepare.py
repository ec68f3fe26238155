"""fipo-data: preparing the recipe datasets from local files (the hub path needs a network)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from fipo_trainer.data.config import DataConfig
from fipo_trainer.data.dataset import PromptDataset
from fipo_trainer.data.prepare import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    DATASETS,
    dedupe,
    main,
    prepare,
    to_verl_rows,
)
from fipo_trainer.data.tiny_model import build_tokenizer
from fipo_trainer.rewards.dapo import compute_score
from tests.helpers.data import SHARED_DATA

SHARED = SHARED_DATA


def test_prepare_all_from_the_shared_dir(tmp_path, capsys):
    assert main(["prepare", "--local-dir", str(SHARED), "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    counts = {name: pq.read_metadata(tmp_path / f"{name}.parquet").num_rows for name in DATASETS}
    # the shared DAPO file still holds 34 repeated (problem, answer) pairs under other indices
    assert counts == {"dapo-math-17k": 17256, "aime-2024": 30, "aime-2025": 30, "math-500": 500}
    assert "dapo-math-17k: 17256 rows, 34 duplicates removed" in out
    assert "aime-2024: 30 rows <-" in out and "math-500: 500 rows <-" in out
    rows = pq.read_table(tmp_path / "aime-2025.parquet").to_pylist()
    src = pq.read_table(SHARED / "aime-2025.parquet").to_pylist()
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in src]
    assert [r["reward_model"]["ground_truth"] for r in rows] == [
        r["reward_model"]["ground_truth"] for r in src
    ]
    assert {r["data_source"] for r in rows} == {"aime25"}
    # the output loads through the dataset and the trainer can grade it
    ds = PromptDataset(
        tmp_path / "aime-2024.parquet", build_tokenizer(), DataConfig(max_prompt_length=4096)
    )
    assert len(ds) == 30


def test_prepare_subset_keep_duplicates_and_explicit_path(tmp_path, capsys):
    code = main(
        [
            "prepare",
            "--out-dir",
            str(tmp_path),
            "--only",
            "aime-2024",
            "--aime-2024",
            str(SHARED / "aime-2024.parquet"),
            "--keep-duplicates",
        ]
    )
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["aime-2024.parquet"]


def test_raw_rows_get_the_dapo_instruction_and_canonical_integers(tmp_path):
    raw = tmp_path / "aime.jsonl"
    raw.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"ID": "2024-I-1", "Problem": "Find x.", "Answer": "023", "Solution": "long"},
                {"ID": "2024-I-2", "Problem": "Find y.", "Answer": 7},
                {"ID": "2024-I-1", "Problem": "Find x.", "Answer": "023", "Solution": "again"},
            ]
        )
    )
    report = prepare(tmp_path / "out", names=["aime-2024"], paths={"aime-2024": raw})
    assert report["aime-2024"]["rows"] == 2 and report["aime-2024"]["duplicates"] == 1
    rows = pq.read_table(tmp_path / "out" / "aime-2024.parquet").to_pylist()
    assert rows[0]["prompt"] == [{"role": "user", "content": f"{DAPO_PREFIX}Find x.{DAPO_SUFFIX}"}]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["23", "7"]
    assert rows[0]["data_source"] == "aime24" and rows[0]["extra_info"]["ID"] == "2024-I-1"
    assert rows[0]["extra_info"]["split"] == "test" and "Solution" not in rows[0]["extra_info"]
    # a correct DAPO-style response to the templated prompt gets reward +1
    assert (
        compute_score("x is 23.\nAnswer: 23", rows[0]["reward_model"]["ground_truth"])["score"]
        == 1.0
    )


def test_dedupe_keeps_first_and_reindexes():
    spec = DATASETS["dapo-math-17k"]
    rows = to_verl_rows(
        [
            {"problem": p, "answer": a}
            for p, a in [("p1", "1"), ("p2", "2"), ("p1", "1"), ("p1", "9")]
        ],
        spec,
        "mem",
    )
    unique = dedupe(rows)
    assert [(r["extra_info"]["problem"], r["reward_model"]["ground_truth"]) for r in unique] == [
        ("p1", "1"),
        ("p2", "2"),
        ("p1", "9"),
    ]
    assert [r["extra_info"]["index"] for r in unique] == [0, 1, 2]


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["prepare", "--out-dir", str(tmp_path)]) == 2
    assert "--local-dir DIR" in capsys.readouterr().err
    assert main(["prepare", "--out-dir", str(tmp_path), "--local-dir", str(tmp_path)]) == 2
    assert "no source for dapo-math-17k" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    assert (
        main(["prepare", "--out-dir", str(tmp_path), "--only", "math-500", "--math-500", str(bad)])
        == 2
    )
    assert "bad.jsonl row 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "--only", "gsm8k"])


def test_arithmetic_and_tiny_model_subcommands(tmp_path, capsys):
    assert (
        main(
            [
                "arithmetic",
                "--out-dir",
                str(tmp_path),
                "--num-train",
                "5",
                "--num-val",
                "3",
                "--format",
                "jsonl",
            ]
        )
        == 0
    )
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 5
    assert main(["tiny-model", "--out-dir", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "m"))
    assert (tmp_path / "m" / "config.json").is_file()


def _one_problem(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    return src


def test_an_out_dir_that_is_a_file_names_the_flag(tmp_path, capsys):
    """Used to end in a raw FileExistsError traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ["prepare", "--only", "math-500", "--math-500", str(_one_problem(tmp_path))]
    assert main([*argv, "--out-dir", str(afile)]) == 2
    err = capsys.readouterr().err
    assert "--out-dir" in err and str(afile) in err and "writable directory" in err
    assert afile.read_text() == "x"
    assert main(["arithmetic", "--num-train", "2", "--num-val", "1", "--out-dir", str(afile)]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert main([*argv, "--out-dir", str(tmp_path / "ok")]) == 0  # the same input is fine


@pytest.mark.parametrize("flag, value", [("--num-val", "-3"), ("--num-train", "0"), ("--num-val", "0")])
def test_arithmetic_counts_must_be_positive(tmp_path, capsys, flag, value):
    """-3 used to be a raw ValueError; 0 wrote a 0-row split and exited 0."""
    with pytest.raises(SystemExit) as stop:
        main(["arithmetic", flag, value, "--out-dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert f"{flag} must be >= 1, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_prepare_refuses_an_empty_input(tmp_path, capsys, suffix):
    """An empty input used to give a 0-row (jsonl: 0-column) parquet and exit 0."""
    empty = tmp_path / f"empty.{suffix}"
    if suffix == "jsonl":
        empty.write_text("")
    else:
        pq.write_table(pq.read_table(SHARED / "aime-2024.parquet").slice(0, 0), empty)
    out = tmp_path / "out"
    assert main(["prepare", "--only", "aime-2024", "--aime-2024", str(empty), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{empty} holds no rows" in err and "aime-2024" in err
    assert not (out / "aime-2024.parquet").exists()
