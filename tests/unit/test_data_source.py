"""The loop's prompt source: built from the training config's one data section."""

from __future__ import annotations

import pytest

from fipo_trainer.data.tiny_model import build_tokenizer
from fipo_trainer.trainer.config import TrainConfig
from fipo_trainer.trainer.data_source import PromptSource


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return path


def test_prompt_source_reads_the_data_section(tokenizer_dir, tmp_path):
    cfg = TrainConfig()
    cfg.model.path = str(tokenizer_dir)
    cfg.trainer.run_dir = str(tmp_path)
    data = cfg.data
    data.train_files = ["builtin:arithmetic"]
    data.val_files = ["builtin:arithmetic"]
    data.synthetic.num_train, data.synthetic.num_val = 40, 6
    data.max_samples, data.truncation, data.max_prompt_length = 30, "right", 12
    train = PromptSource.for_split(cfg, "train")
    loader = train.dataset.config
    assert (loader.max_samples, loader.truncation, loader.max_prompt_length) == (30, "right", 12)
    assert len(train) == 30 and train.dataset.stats.truncated > 0
    assert all(len(it.prompt_ids) <= 12 for it in train.dataset.items)
    assert train.sampler.shuffle and not train.sampler.drop_last
    batch = train.next_batch(35, "s1")  # more than an epoch: wraps into the next one
    assert len(batch) == 35 and train.epoch == 1 and batch["uid"][0] == "s1-0"
    val = PromptSource.for_split(cfg, "val")
    assert len(val) == 6 and not val.sampler.shuffle
    assert (tmp_path / "data" / "arithmetic_val.jsonl").is_file()


def test_routed_graders_are_those_of_the_rows_data_sources(tokenizer_dir, tmp_path):
    from fipo_trainer.rewards import RewardConfig
    from fipo_trainer.trainer.data_source import routed_graders

    cfg = TrainConfig()
    cfg.model.path = str(tokenizer_dir)
    cfg.trainer.run_dir = str(tmp_path)
    cfg.data.train_files = cfg.data.val_files = ["builtin:arithmetic"]
    cfg.data.synthetic.num_train, cfg.data.synthetic.num_val = 8, 4
    sources = PromptSource.for_split(cfg, "train"), PromptSource.for_split(cfg, "val")
    quickstart = RewardConfig(routes={"arithmetic": "dapo"})  # default grader: math-verify
    assert routed_graders(quickstart, *sources) == {"dapo"}
    assert routed_graders(RewardConfig(routes={}), *sources) == {"math_verify"}
