"""Bad data that used to train silently: blank prompts, a missing reward_model column, and
``--dry-run`` reading each data file's columns and first rows (issue 12, item 6)."""

from __future__ import annotations

import re

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


def test_the_dry_run_tokenizes_every_row_as_training_loads_it(tmp_path, capsys):
    """A prompt too long for data.max_prompt_length past the checked head (row 20 of 21)
    passed the dry run, then failed (truncation=error) or emptied the split (filter) only
    after Ray and every worker started. The dry run now loads every row as training does."""
    rows = [row(i) for i in range(20)] + [row(20, "What is 1+1? " * 20)]
    path = parquet(tmp_path / "long.parquet", rows)
    files = [f"data.train_files=[{path}]", f"data.val_files=[{path}]"]
    code, err = dry(capsys, *files, "data.max_prompt_length=64", "data.truncation=error")
    assert code == 2 and "config OK" not in err, err
    assert f"{path} row 20: prompt has" in err and "> data.max_prompt_length=64" in err
    code, err = dry(capsys, *files, "data.max_prompt_length=64")  # the default cuts it
    assert code == 0 and "data.train_files: 21 of 21 rows are prompts (0 dropped and 1 cut" in err
    code, err = dry(capsys, *files, "data.max_prompt_length=64", "data.truncation=filter")
    assert code == 0, err
    line = "of 21 rows are prompts (1 dropped and 0 cut as longer than data.max_prompt_length=64"
    assert f"data.train_files: 20 {line}" in err and f"data.val_files: 20 {line}" in err
    code, err = dry(capsys, *files, "data.max_prompt_length=8", "data.truncation=filter")
    assert code == 2 and "no usable prompts" in err and "raise data.max_prompt_length" in err
    code, err = dry(capsys)  # built-in data is generated, not read: nothing to report
    assert code == 0 and "rows are prompts" not in err, err


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
    from fipo_trainer.trainer import launch

    def bad_row(cfg):
        raise DataError("/d/train.parquet row 1234: column 'prompt' is empty")

    monkeypatch.setattr(launch, "launch", bad_row)
    with pytest.raises(SystemExit) as exited:
        cli._train_task(cli.compose_config(["model.tiny.warm_start_steps=0"]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "fipo-train: /d/train.parquet row 1234: column 'prompt' is empty" in err
    assert "Traceback" not in err


# ------------------------------------------------ review: inputs that failed late or as traces


def test_a_directory_as_data_file_is_refused_by_the_dry_run_and_the_reader(tmp_path, capsys):
    """A directory passed as a data file: the dry run (and so the start-up check) says it is
    a directory and lists its files, not "config OK" then "not found" after Ray started."""
    from fipo_trainer.data.records import read_records

    folder = tmp_path / "train_dir"
    folder.mkdir()
    parquet(folder / "part-0.parquet", [row(0)])
    code, err = dry(capsys, f"data.train_files=[{folder}]")
    assert code == 2 and "config OK" not in err, err
    assert f"data.train_files: {str(folder)!r} is a directory" in err
    assert "part-0.parquet" in err  # the file to pass instead
    with pytest.raises(DataError, match=rf"{re.escape(str(folder))} is a directory, not a data file: pass"):
        read_records(folder)


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_an_empty_data_file_fails_the_dry_run_naming_the_key(tmp_path, capsys, kind):
    empty = tmp_path / f"empty.{kind}"
    if kind == "parquet":
        pd.DataFrame(columns=list(row(0))).to_parquet(empty)  # a schema, 0 rows
    else:
        empty.write_text("\n")
    good = parquet(tmp_path / "good.parquet", [row(0)])
    code, err = dry(capsys, f"data.train_files=[{empty}]", f"data.val_files=[{good}]")
    assert code == 2 and "config OK" not in err, err
    assert f"data.train_files: {[str(empty)]} hold no rows" in err
    assert "max_prompt_length" not in err
    # one empty file beside a full one: training warns and goes on, so does the dry run
    code, err = dry(capsys, f"data.train_files=[{empty},{good}]", f"data.val_files=[{good}]")
    assert code == 0 and "config OK" in err, err


def test_the_dataset_names_the_real_reason_it_has_no_prompts(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as err:
        PromptDataset(empty, tok, DataConfig())
    assert "hold no rows" in str(err.value) and "max_prompt_length" not in str(err.value)
    long = parquet(tmp_path / "long.parquet", [row(0, "x" * 200)])
    with pytest.raises(DataError, match=r"longer than data\.max_prompt_length=16"):
        PromptDataset(long, tok, DataConfig(max_prompt_length=16, truncation="filter"))


def test_a_file_that_is_not_utf8_is_a_data_error_naming_file_and_line(tmp_path, capsys):
    from fipo_trainer.data.records import read_records

    bad = tmp_path / "latin.jsonl"
    good_line = '{"problem": "1+1", "answer": "2"}\n'
    bad.write_bytes(good_line.encode() + '{"problem": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    for reader in (read_records, lambda p: PromptDataset(p, build_tokenizer(), DataConfig())):
        with pytest.raises(DataError, match=rf"{re.escape(str(bad))} line 2: not UTF-8 \(byte 0xe9"):
            reader(bad)
    code, err = dry(capsys, f"data.train_files=[{bad}]")
    assert code == 2 and f"data.train_files: {bad} line 2: not UTF-8" in err, err
    whole = tmp_path / "latin.json"
    whole.write_bytes(b'[{"problem": "caf\xe9", "answer": "1"}]')
    with pytest.raises(DataError, match=rf"{re.escape(str(whole))} line 1: not UTF-8"):
        read_records(whole)


def model_dir(path, template: str | None):
    """A model directory as the start-up check sees it: config.json and a tokenizer, the chat
    template in neither / the config's key / a chat_template.jinja file."""
    import json

    tokenizer = build_tokenizer()  # the dry run tokenizes the data with it
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    if template == "key":
        tok_cfg["chat_template"] = "{{ messages[0]['content'] }}"
    if template == "jinja":
        (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return path


def test_a_model_without_chat_template_fails_the_dry_run_when_one_is_applied(tmp_path, capsys):
    good = parquet(tmp_path / "good.parquet", [row(0)])
    files = [f"data.train_files=[{good}]", f"data.val_files=[{good}]", "model.tiny.enable=false"]
    base = model_dir(tmp_path / "base", None)
    code, err = dry(capsys, *files, f"model.path={base}")
    assert code == 2 and "config OK" not in err, err
    assert "has no chat template" in err and "data.apply_chat_template=false" in err
    code, err = dry(capsys, *files, f"model.path={base}", "data.apply_chat_template=false")
    assert code == 0, err
    for template in ("key", "jinja"):
        with_template = model_dir(tmp_path / template, template)
        code, err = dry(capsys, *files, f"model.path={with_template}")
        assert code == 0, err


def test_a_tokenizer_without_chat_template_is_a_one_line_data_error(tmp_path):
    plain = build_tokenizer()
    plain.chat_template = None
    path = parquet(tmp_path / "good.parquet", [row(0)])
    with pytest.raises(DataError, match=r"no chat template: set data\.apply_chat_template=false"):
        PromptDataset(path, plain, DataConfig(apply_chat_template=True))


def test_a_tokenizer_that_does_not_load_fails_the_dry_run_naming_the_key(tmp_path, capsys):
    good = parquet(tmp_path / "good.parquet", [row(0)])
    model = model_dir(tmp_path / "model", "key")
    (model / "tokenizer.json").write_text("{not json")
    files = [f"data.train_files=[{good}]", f"data.val_files=[{good}]", "model.tiny.enable=false"]
    code, err = dry(capsys, *files, f"model.path={model}")
    assert code == 2 and "config OK" not in err, err
    assert f"model.path={model}: its tokenizer does not load" in err


def test_the_multirun_dry_run_loads_every_jobs_data(tmp_path, capsys):
    """``--dry-run --multirun`` checks each job as the dry run checks one: a job whose
    data.max_prompt_length is too short for a row under truncation=error is the bad job."""
    path = parquet(tmp_path / "long.parquet", [row(i) for i in range(3)] + [row(3, "1+1? " * 30)])
    files = [f"data.train_files=[{path}]", f"data.val_files=[{path}]", "data.truncation=error"]
    code = cli.dry_run_sweep([*files, "data.max_prompt_length=512,64"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert re.search(r"job 0: .*data.max_prompt_length=512: OK", out), out
    assert re.search(r"job 1: .*data.max_prompt_length=64: ERROR", out), out
    assert f"{path} row 3: prompt has" in err and "sweep: 1 of 2 jobs invalid" in err
