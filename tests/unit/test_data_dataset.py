"""Prompt dataset: real verl files, the raw schema, bad rows, truncation, collate, sampler."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from fipo_trainer.data.config import DataConfig
from fipo_trainer.data.dataset import (
    DataError,
    PromptDataset,
    ResumableSampler,
    collate_prompts,
    read_records,
)
from fipo_trainer.data.synthetic import make_rows, write_rows
from fipo_trainer.data.tiny_model import build_tokenizer
from tests.helpers.data import SHARED_DATA

SHARED = SHARED_DATA


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_row(i: int = 0, **over) -> dict:
    row = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": f"What is {i}+1?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
        "extra_info": {"index": i},
    }
    row.update(over)
    return row


# ------------------------------------------------------------------------ real verl files
def test_aime_file_loads_with_chat_template(tok):
    ds = PromptDataset(SHARED / "aime-2024.parquet", tok, DataConfig(max_prompt_length=4096))
    assert len(ds) == 30 and ds.stats.rows_read == 30 and ds.stats.dropped_too_long == 0
    item = ds[0]
    assert item.data_source == "aime24"
    assert isinstance(item.ground_truth, str) and item.ground_truth.isdigit()
    text = tok.decode(item.prompt_ids)
    assert text.startswith("<|user|>") and text.endswith("<|end|><|assistant|>")
    assert item.raw_prompt[0]["role"] == "user" and "Answer:" in item.raw_prompt[0]["content"]
    assert item.source == "aime-2024.parquet:0"


def test_long_prompts_are_filtered_counted_and_logged(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="fipo_trainer.data.dataset"):
        ds = PromptDataset(SHARED / "math-500.parquet", tok, DataConfig(max_prompt_length=300))
    assert 0 < ds.stats.dropped_too_long < 500
    assert len(ds) + ds.stats.dropped_too_long == 500
    assert all(len(it.prompt_ids) <= 300 for it in ds.items)
    assert f"dropped {ds.stats.dropped_too_long} of 500" in caplog.text


def test_truncation_modes(tok, tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "d.jsonl", [good_row(0, prompt=[{"role": "user", "content": "x" * 50 + "END"}])]
    )
    with caplog.at_level(logging.WARNING, logger="fipo_trainer.data.dataset"):
        left = PromptDataset(path, tok, DataConfig(max_prompt_length=20, truncation="left"))
    # cut prompts train on part of the question: said once, as dropped ones are
    assert "cut 1 of 1 prompts longer than data.max_prompt_length=20 tokens" in caplog.text
    assert "data.truncation=left" in caplog.text
    assert len(left[0].prompt_ids) == 20 and tok.decode(left[0].prompt_ids).endswith(
        "END<|end|><|assistant|>"
    )
    assert left.stats.truncated == 1
    right = PromptDataset(path, tok, DataConfig(max_prompt_length=20, truncation="right"))
    assert tok.decode(right[0].prompt_ids).startswith("<|user|>xxx")
    with pytest.raises(
        DataError, match=r"d\.jsonl row 0: prompt has 56 tokens > data.max_prompt_length=20"
    ):
        PromptDataset(path, tok, DataConfig(max_prompt_length=20, truncation="error"))
    with pytest.raises(DataError, match="no usable prompts"):
        PromptDataset(path, tok, DataConfig(max_prompt_length=20, truncation="filter"))


def test_several_files_and_max_samples(tok):
    files = [SHARED / "aime-2024.parquet", SHARED / "aime-2025.parquet"]
    ds = PromptDataset(files, tok, DataConfig(max_prompt_length=4096))
    assert len(ds) == 60 and {it.data_source for it in ds.items} == {"aime24", "aime25"}
    small = PromptDataset(files, tok, DataConfig(max_prompt_length=4096, max_samples=35))
    assert len(small) == 35 and small[34].data_source == "aime25"


# ------------------------------------------------------------------------ raw schema / plain
def test_raw_schema_with_template_and_system_prompt(tok, tmp_path):
    rows = [
        {"problem": "1+1", "answer": 2},
        {"problem": "2+3", "answer": "5", "data_source": "mine"},
    ]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    cfg = DataConfig(prompt_template="Q: {problem}\nEnd with Answer:", system_prompt="Be brief.")
    ds = PromptDataset(path, tok, cfg)
    assert [it.ground_truth for it in ds.items] == ["2", "5"]  # ints become strings
    assert [it.data_source for it in ds.items] == ["math", "mine"]
    assert ds[0].raw_prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: 1+1\nEnd with Answer:"},
    ]
    assert (
        tok.decode(ds[0].prompt_ids)
        == "<|system|>Be brief.<|end|><|user|>Q: 1+1\nEnd with Answer:<|end|><|assistant|>"
    )
    assert ds[0].extra_info["problem"] == "1+1"


def test_plain_text_prompts_for_base_models(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good_row(4)])
    ds = PromptDataset(path, tok, DataConfig(apply_chat_template=False))
    assert tok.decode(ds[0].prompt_ids) == "What is 4+1?"
    no_template = build_tokenizer()
    no_template.chat_template = None
    auto = PromptDataset(path, no_template, DataConfig())  # auto: no template -> plain text
    assert not auto.use_chat_template and auto[0].prompt_ids == ds[0].prompt_ids
    with pytest.raises(ValueError, match="apply_chat_template=false"):
        PromptDataset(path, no_template, DataConfig(apply_chat_template=True))


def test_synthetic_parquet_roundtrip(tok, tmp_path):
    path = write_rows(make_rows(20, seed=3), tmp_path / "arith.parquet")
    ds = PromptDataset(path, tok, DataConfig())
    assert len(ds) == 20 and ds[0].data_source == "arithmetic"
    assert ds[0].ground_truth == make_rows(1, seed=3)[0]["reward_model"]["ground_truth"]


# ------------------------------------------------------------------------ bad data
@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"reward_model": {"style": "rule"}},
            r"row 2: field 'reward_model.ground_truth' is missing",
        ),
        ({"reward_model": None}, r"row 2: field 'reward_model' must be a dict"),
        (
            {"prompt": "What is 2?"},
            r"row 2: field 'prompt' must be a non-empty list of chat messages",
        ),
        ({"prompt": []}, r"row 2: field 'prompt' must be a non-empty list"),
        (
            {"prompt": [{"role": "user", "content": 7}]},
            r"row 2: prompt\[0\]\.content must be a string, got int",
        ),
        ({"prompt": ["hi"]}, r"row 2: prompt\[0\] must be a dict"),
        ({"data_source": None}, r"row 2: field 'data_source' must be a non-empty string"),
        ({"extra_info": [1]}, r"row 2: field 'extra_info' must be a dict"),
        ({"reward_model": {"ground_truth": ["1"]}}, r"ground_truth' must be a string, got list"),
        ({"reward_model": {"ground_truth": "  "}}, r"ground_truth' is empty"),
    ],
)
def test_bad_rows_name_file_row_and_field(tok, tmp_path, bad, message):
    rows = [good_row(0), good_row(1), good_row(2, **bad), good_row(3)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as err:
        PromptDataset(path, tok, DataConfig())
    assert "bad.jsonl" in str(err.value) and "skip_bad_rows" in str(err.value)
    ds = PromptDataset(path, tok, DataConfig(skip_bad_rows=True))
    assert len(ds) == 3 and ds.stats.skipped_bad == 1
    assert [it.ground_truth for it in ds.items] == ["1", "2", "4"]


def test_bad_rows_in_parquet(tok, tmp_path):
    rows = [good_row(0), good_row(1, reward_model={"style": "rule", "ground_truth": None})]
    path = write_rows(rows, tmp_path / "bad.parquet")
    with pytest.raises(
        DataError, match=r"bad\.parquet row 1: field 'reward_model.ground_truth' is missing"
    ):
        PromptDataset(path, tok, DataConfig())


def test_bad_files(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        read_records(tmp_path / "nope.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        read_records(tmp_path / "x.csv")
    (tmp_path / "broken.jsonl").write_text(json.dumps(good_row()) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl line 2: invalid JSON"):
        read_records(tmp_path / "broken.jsonl")
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read parquet"):
        read_records(tmp_path / "corrupt.parquet")
    path = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "solution": "s"}])
    with pytest.raises(
        DataError, match=r"cannot tell the schema from columns \['question', 'solution'\]"
    ):
        PromptDataset(path, tok, DataConfig())
    raw = PromptDataset(path, tok, DataConfig(problem_key="question", answer_key="solution"))
    assert raw[0].ground_truth == "s"
    with pytest.raises(ValueError, match="no data files"):
        PromptDataset([], tok, DataConfig())


def test_config_validation():
    with pytest.raises(ValueError, match=r"data\.truncation"):
        DataConfig(truncation="middle")
    with pytest.raises(ValueError, match=r"data\.schema"):
        DataConfig(schema="csv")
    with pytest.raises(ValueError, match="prompt_template"):
        DataConfig(prompt_template="no placeholder")


# ------------------------------------------------------------------------ collate
def test_collate_left_pads_into_a_batch(tok, tmp_path):
    rows = [
        good_row(5),
        good_row(123456, prompt=[{"role": "user", "content": "longer prompt here"}]),
    ]
    ds = PromptDataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, DataConfig())
    b = ds.collate([1, 0], uid_prefix="s3r0")
    n0, n1 = len(ds[1].prompt_ids), len(ds[0].prompt_ids)
    assert b["input_ids"].shape == (2, max(n0, n1)) and n0 > n1
    assert b["attention_mask"].sum(1).tolist() == [n0, n1]
    assert b["input_ids"][1, : n0 - n1].tolist() == [tok.pad_token_id] * (n0 - n1)
    assert b["input_ids"][1, n0 - n1 :].tolist() == ds[0].prompt_ids
    assert b["position_ids"][1].tolist() == [0] * (n0 - n1) + list(range(n1))
    assert list(b["uid"]) == ["s3r0-0", "s3r0-1"]
    assert list(b["ground_truth"]) == ["123457", "6"]
    assert b["extra_info"][0] == {"index": 123456} and b["raw_prompt"][1][0]["role"] == "user"
    assert list(b["data_source"]) == ["math_dapo"] * 2
    random_uids = ds.collate([0, 1])["uid"]
    assert len(set(random_uids)) == 2
    with pytest.raises(ValueError, match="pad token"):
        collate_prompts([ds[0]], None)
    fixed = ds.collate([0], pad_to=40)
    assert fixed["input_ids"].shape == (1, 40) and fixed["attention_mask"].sum() == n1
    assert fixed["input_ids"][0, 40 - n1 :].tolist() == ds[0].prompt_ids
    with pytest.raises(ValueError, match="shorter than the longest prompt"):
        ds.collate([0, 1], pad_to=n0 - 1)


# ------------------------------------------------------------------------ sampler
def draw(sampler: ResumableSampler, sizes: list[int]) -> list[list[int]]:
    return [sampler.next_indices(s) for s in sizes]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def test_sampler_epochs_are_permutations_and_seeded():
    s = ResumableSampler(10, seed=1)
    e0 = flat(draw(s, [5, 5]))
    e1 = flat(draw(s, [5, 5]))
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    assert s.epoch == 1
    again = ResumableSampler(10, seed=1)
    assert flat(draw(again, [5, 5, 5, 5])) == e0 + e1
    other = ResumableSampler(10, seed=2)
    assert flat(draw(other, [5, 5])) != e0
    plain = ResumableSampler(5, shuffle=False)
    assert draw(plain, [2, 2, 2]) == [[0, 1], [2, 3], [0, 1]]  # drop_last: new epoch


def test_sampler_drop_last_false_gives_short_last_batch():
    s = ResumableSampler(5, shuffle=False, drop_last=False)
    assert draw(s, [2, 2, 2, 2]) == [[0, 1], [2, 3], [4], [0, 1]]
    assert s.epoch == 1  # 3 batches in epoch 0 (the last one short)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume_gives_identical_order_at_every_point(drop_last):
    sizes = [3] * 12  # 7 rows: with drop_last an epoch boundary falls after every 2nd draw
    ref = ResumableSampler(7, seed=5, drop_last=drop_last)
    expected = draw(ref, sizes)
    for k in range(len(sizes) + 1):
        first = ResumableSampler(7, seed=5, drop_last=drop_last)
        head = draw(first, sizes[:k])
        state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
        resumed = ResumableSampler(7, seed=0, drop_last=drop_last)  # seed comes from the state
        resumed.load_state_dict(state)
        assert head + draw(resumed, sizes[k:]) == expected, f"resume after {k} draws differs"


def test_a_sampler_that_drew_before_loading_a_state_follows_the_states_seed():
    """A loaded state with another seed replaces the order drawn under the old one."""
    used = ResumableSampler(10, seed=1)
    used.next_indices(3)
    fresh = ResumableSampler(10, seed=2)
    used.load_state_dict(fresh.state_dict())
    assert used.next_indices(4) == fresh.next_indices(4)


def test_sampler_epochs_and_errors():
    s = ResumableSampler(7, seed=0)
    epoch0 = draw(s, [3, 3])  # drop_last: 2 batches of 3 per epoch of 7 rows
    assert s.epoch == 0
    epoch1 = draw(s, [3, 3])
    assert s.epoch == 1 and epoch0 != epoch1
    with pytest.raises(ValueError, match=r"batch size must be in 1\.\.7"):
        s.next_indices(8)
    from fipo_trainer.data.records import DataError  # one line from the CLI, not a traceback

    with pytest.raises(DataError, match=r"resume with the same data\.train_files"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 0, "num_rows": 9})
    with pytest.raises(ValueError):
        ResumableSampler(0)


def test_sampler_over_a_real_dataset(tok):
    ds = PromptDataset(SHARED / "aime-2025.parquet", tok, DataConfig(max_prompt_length=4096))
    s = ResumableSampler(len(ds), seed=0)
    batch = ds.collate(s.next_indices(8), uid_prefix="s0")
    assert len(batch) == 8 and set(batch["data_source"]) == {"aime25"}
    assert torch.all(batch["attention_mask"].sum(1) > 0)


# ------------------------------------------------------------------------ one data config
def test_loader_settings_come_from_the_training_data_section():
    from fipo_trainer.trainer.config import TrainDataConfig

    section = TrainDataConfig(
        truncation="right", max_prompt_length=77, schema="raw", problem_key="q",
        answer_key="a", prompt_template="Q: {problem}", skip_bad_rows=True, max_samples=5,
        apply_chat_template=False, prompt_key="messages",
    )
    cfg = DataConfig.from_section(section)
    assert (cfg.truncation, cfg.max_prompt_length, cfg.schema) == ("right", 77, "raw")
    assert (cfg.problem_key, cfg.answer_key, cfg.prompt_template) == ("q", "a", "Q: {problem}")
    assert (cfg.skip_bad_rows, cfg.max_samples, cfg.apply_chat_template) == (True, 5, False)
    assert cfg.prompt_key == "messages"
    # what the section does not set keeps the loader's default
    assert cfg.raw_data_source == DataConfig().raw_data_source
    with pytest.raises(ValueError, match=r"data\.truncation"):
        DataConfig.from_section(TrainDataConfig(truncation="middle"))


def test_the_first_step_reports_what_loading_cut_or_dropped(tok, tmp_path):
    """``data_metrics`` (logged with step 1): prompts kept, bad rows skipped, prompts dropped
    or cut for length, per split."""
    from fipo_trainer.trainer.data_source import PromptSource, data_metrics

    long = [good_row(i, prompt=[{"role": "user", "content": "x" * 50}]) for i in range(2)]
    path = write_jsonl(tmp_path / "d.jsonl", [good_row(9), *long])
    cut = PromptDataset(path, tok, DataConfig(max_prompt_length=20, truncation="left"))
    dropped = PromptDataset(path, tok, DataConfig(max_prompt_length=20, truncation="filter"))
    metrics = data_metrics(
        PromptSource(cut, shuffle=False, seed=0), PromptSource(dropped, shuffle=False, seed=0)
    )
    assert metrics["data/prompts"] == 3 and metrics["data/truncated_too_long"] == 2
    assert metrics["data/dropped_too_long"] == 0
    assert metrics["data/val_prompts"] == 1 and metrics["data/val_dropped_too_long"] == 2
    assert metrics["data/val_truncated_too_long"] == 0
