"""Bad data that used to train silently: blank prompts, a missing reward_model column, and
``--dry-run`` reading each data file's columns and first rows (issue 12, item 6)."""

from __future__ import annotations

import pandas as pd
import pytest

from fipo_trainer import cli
from fipo_trainer.data.config import DataConfig
from fipo_trainer.data.dataset import DataError, PromptDataset
from fipo_trainer.data.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def row(i: int, content: str | None = None, **over) -> dict:
    r = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": f"What is {i}+1?" if content is None else content}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
        "extra_info": {"index": i},
    }
    r.update(over)
    return r


def parquet(path, rows: list[dict], drop: tuple[str, ...] = ()):
    pd.DataFrame(rows).drop(columns=list(drop)).to_parquet(path)
    return path


@pytest.mark.parametrize("blank", ["", "   \n\t"])
def test_blank_prompt_is_a_bad_row_naming_file_row_and_column(tok, tmp_path, blank):
    path = parquet(tmp_path / "blank.parquet", [row(0), row(1, blank), row(2)])
    with pytest.raises(DataError) as err:
        PromptDataset(path, tok, DataConfig())
    msg = str(err.value)
    assert f"{path} row 1" in msg and "column 'prompt'" in msg and "prompt[0].content" in msg
    assert "drop it" in msg and "skip_bad_rows=true" in msg
    ds = PromptDataset(path, tok, DataConfig(skip_bad_rows=True))  # the skip policy applies
    assert len(ds) == 2 and ds.stats.skipped_bad == 1
    assert [it.ground_truth for it in ds.items] == ["1", "3"]


def test_missing_reward_model_column_is_reported_once_for_the_file(tok, tmp_path):
    path = parquet(tmp_path / "norm.parquet", [row(i) for i in range(5)], drop=("reward_model",))
    for skip in (False, True):  # a file problem, not five bad rows
        with pytest.raises(DataError) as err:
            PromptDataset(path, tok, DataConfig(skip_bad_rows=skip))
        msg = str(err.value)
        assert str(path) in msg and "missing column(s) ['reward_model']" in msg
        assert "['ability', 'data_source', 'extra_info', 'prompt']" in msg  # what it has
        assert "row 0" not in msg and msg.count(str(path)) == 1


def test_preview_reads_columns_and_first_rows_only(tmp_path):
    from fipo_trainer.data.records import preview_problems

    rows = [row(i) for i in range(20)] + [row(20, "")]
    path = parquet(tmp_path / "late.parquet", rows)
    assert preview_problems(path, DataConfig()) == ([], [])  # row 20 is past the first 8
    problems, bad = preview_problems(path, DataConfig(), rows=21)
    assert problems == [] and len(bad) == 1 and "row 20" in bad[0]


def dry(capsys, *overrides: str) -> tuple[int, str]:
    code = cli.dry_run(list(overrides))
    return code, capsys.readouterr().err


def test_dry_run_reports_a_file_without_a_prompt_column(tmp_path, capsys):
    path = parquet(tmp_path / "noprompt.parquet", [row(0), row(1)], drop=("prompt",))
    code, err = dry(capsys, f"data.train_files=[{path}]")
    assert code == 2, err
    assert "config OK" not in err
    assert f"data.train_files: {path}: cannot tell the schema from columns" in err
    code, err = dry(capsys, f"data.train_files=[{path}]", "data.schema=verl")
    assert code == 2 and "missing column(s) ['prompt']" in err


def test_dry_run_reports_unreadable_files_and_bad_first_rows(tmp_path, capsys, caplog):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    code, err = dry(capsys, f"data.val_files=[{corrupt}]")
    assert code == 2 and f"data.val_files: {corrupt}: cannot read parquet" in err
    bad = parquet(tmp_path / "bad.parquet", [row(0), row(1), row(2, " ")])
    code, err = dry(capsys, f"data.train_files=[{bad}]")
    assert code == 2 and f"{bad} row 2: column 'prompt'" in err and "skip_bad_rows=true" in err
    norm = parquet(tmp_path / "norm.parquet", [row(0)], drop=("reward_model",))
    code, err = dry(capsys, f"data.train_files=[{norm}]")
    assert code == 2 and "missing column(s) ['reward_model']" in err
    # data.skip_bad_rows=true: training skips such rows, so the dry run only warns
    code, err = dry(capsys, f"data.train_files=[{bad}]", "data.skip_bad_rows=true")
    assert code == 0 and "config OK" in err
    assert f"{bad} row 2" in caplog.text and "skipped: data.skip_bad_rows=true" in caplog.text


def test_dry_run_accepts_a_good_file(tmp_path, capsys):
    good = parquet(tmp_path / "good.parquet", [row(i) for i in range(3)])
    code, err = dry(capsys, f"data.train_files=[{good}]", f"data.val_files=[{good}]")
    assert code == 0 and "config OK" in err, err


def test_a_training_run_checks_the_data_heads_before_anything_starts(tmp_path):
    """``prepare_config`` (what ``fipo-train`` runs before Ray) reads each file's head as the
    dry run does: a file without a prompt column fails there, naming the key and the file,
    not after Ray and every worker started."""
    from fipo_trainer.trainer.config import ConfigError, prepare_config

    path = parquet(tmp_path / "noprompt.parquet", [row(0), row(1)], drop=("prompt",))
    cfg = cli.compose_config([f"data.train_files={path}", "model.tiny.warm_start_steps=0"])
    with pytest.raises(ConfigError, match=rf"data.train_files: {path}: cannot tell the schema"):
        prepare_config(cfg)


def test_a_bad_row_found_by_training_is_a_message_not_a_traceback(monkeypatch, capsys):
    """A bad row past the checked head fails when training reads it (after Ray started):
    ``fipo-train`` then prints its file, row and column and exits 2, as for a bad config."""
    from fipo_trainer.trainer import loop

    def bad_row(cfg):
        raise DataError("/d/train.parquet row 1234: column 'prompt' is empty")

    monkeypatch.setattr(loop, "run_training", bad_row)
    with pytest.raises(SystemExit) as exited:
        cli._train_task(cli.compose_config(["model.tiny.warm_start_steps=0"]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "fipo-train: /d/train.parquet row 1234: column 'prompt' is empty" in err
    assert "Traceback" not in err
