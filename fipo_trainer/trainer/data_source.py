"""Prompts for the loop: the dataset, a resumable sampler that crosses epochs, collation.

Why its own object: dynamic sampling draws a variable number of prompt batches per step, so
the loop asks for "the next N prompts" rather than iterating a DataLoader; epochs roll over
inside the sampler, and its (epoch, position) state makes resume exact, also at an epoch
boundary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fipo_trainer.data.config import DataConfig
from fipo_trainer.data.dataset import PromptDataset
from fipo_trainer.data.records import DataError
from fipo_trainer.data.sampler import ResumableSampler
from fipo_trainer.rewards.config import RewardConfig
from fipo_trainer.trainer.config import BUILTIN_PREFIX, TrainConfig

if TYPE_CHECKING:
    from fipo_trainer.data.batch import Batch


class PromptSource:
    """A `PromptDataset` plus a `ResumableSampler` over it."""

    def __init__(self, dataset: PromptDataset, *, shuffle: bool, seed: int) -> None:
        self.dataset = dataset
        # Dynamic sampling may ask for more prompts than an epoch has left: never drop them.
        self.sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, drop_last=False)

    @classmethod
    def for_split(cls, cfg: TrainConfig, split: str) -> PromptSource:
        from fipo_trainer.data.tokenization import load_tokenizer

        data = cfg.data
        tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        files = [
            resolve_file(spec, cfg, split)
            for spec in (data.train_files if split == "train" else data.val_files)
        ]
        dataset = PromptDataset(files, tokenizer, DataConfig.from_section(data))
        return cls(dataset, shuffle=data.shuffle and split == "train", seed=data.seed)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def next_batch(self, size: int, uid_prefix: str) -> Batch:
        """The next `size` prompts (wrapping into the next epoch), uids `<prefix>-<row>`."""
        indices: list[int] = []
        while len(indices) < size:
            indices += self.sampler.next_indices(min(size - len(indices), len(self)))
        return self.dataset.collate(indices, uid_prefix=uid_prefix)

    def all_prompts(self, uid_prefix: str) -> Batch:
        return self.dataset.collate(list(range(len(self))), uid_prefix=uid_prefix)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def resolve_file(spec: str, cfg: TrainConfig, split: str) -> Path:
    """A data file path; `builtin:arithmetic` is generated (seeded) into the run directory."""
    if not str(spec).startswith(BUILTIN_PREFIX):
        return Path(spec)
    from fipo_trainer.data.synthetic import ArithmeticTask, make_rows, write_rows

    syn = cfg.data.synthetic
    n = syn.num_train if split == "train" else syn.num_val
    rows = make_rows(n, seed=syn.seed, task=ArithmeticTask(digits=syn.digits), split=split)
    return write_rows(rows, Path(cfg.trainer.run_dir) / "data" / f"arithmetic_{split}.jsonl")


def data_metrics(train: PromptSource, val: PromptSource) -> dict[str, float]:
    """What loading the datasets dropped (logged once, with the first step)."""
    out = {}
    for split, source in (("train", train), ("val", val)):
        stats = source.dataset.stats
        prefix = "data/" if split == "train" else "data/val_"
        out[f"{prefix}prompts"] = float(len(source))
        out[f"{prefix}skipped_bad_rows"] = float(stats.skipped_bad)
        out[f"{prefix}dropped_too_long"] = float(stats.dropped_too_long)
        out[f"{prefix}truncated_too_long"] = float(stats.truncated)
    return out


def routed_graders(reward: RewardConfig, *sources: PromptSource) -> set[str]:
    """The graders the rows of ``sources`` are routed to (what the reward pool warms up)."""
    names = {item.data_source for source in sources for item in source.dataset.items}
    return {reward.grader_for(name) for name in names}


SPLITS = ("train_files", "val_files")
_LOADED_REPORTS: dict[str, list[str]] = {}


def loaded_prompts_report(cfg: TrainConfig) -> list[str]:
    """Each split's files loaded as training loads them (tokenized, length-filtered): one line
    per split, for ``fipo-train --dry-run``.

    Why the dry run tokenizes every row: a prompt longer than ``data.max_prompt_length`` under
    ``data.truncation=error``, or a split that filtering leaves empty, otherwise fails only
    once Ray and every worker have started (minutes on the paper's layout). Raises
    `DataError` naming the file, the row and the fix. Built-in data is generated, not read;
    a tiny model built at start is checked with its tokenizer (built in code). A report is
    kept per distinct data setting (``--dry-run --multirun`` checks every job).
    """
    from fipo_trainer.data.tiny_model import build_tokenizer
    from fipo_trainer.data.tokenization import load_tokenizer

    data = cfg.data
    path = cfg.model.tokenizer_path or cfg.model.path
    files = {k: [f for f in getattr(data, k) if not f.startswith(BUILTIN_PREFIX)] for k in SPLITS}
    stamps = [(f, os.stat(f).st_mtime_ns) for k in SPLITS for f in files[k] if os.path.isfile(f)]
    loader = DataConfig.from_section(data)
    cache_key = repr((files, stamps, path, loader))
    if cache_key in _LOADED_REPORTS:  # a sweep's jobs mostly share their data
        return _LOADED_REPORTS[cache_key]
    try:
        tokenizer = load_tokenizer(path) if path else build_tokenizer()
    except Exception as err:  # training would fail on it after Ray started
        key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.path"
        raise DataError(f"{key}={path}: its tokenizer does not load: {err}") from None
    lines = []
    for key in SPLITS:
        if not files[key]:
            continue
        dataset = PromptDataset([Path(f) for f in files[key]], tokenizer, loader)
        stats = dataset.stats
        lines.append(
            f"data.{key}: {len(dataset)} of {stats.rows_read} rows are prompts "
            f"({stats.dropped_too_long} dropped and {stats.truncated} cut as longer than "
            f"data.max_prompt_length={data.max_prompt_length} tokens, {stats.skipped_bad} bad "
            "rows skipped)"
        )
    _LOADED_REPORTS[cache_key] = lines
    return lines
