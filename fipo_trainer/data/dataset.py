"""The prompt dataset: validated rows, templated and tokenised, length-filtered; the collate.

Why checked at load: a malformed row deep inside a 17k-row file otherwise surfaces as a
shape error or a silent zero reward hours into a run, so every row is validated
(:mod:`fipo_trainer.data.records`, which names file, row and field) and can optionally be
skipped with a count instead. Rows are tokenised by :mod:`fipo_trainer.data.tokenization`,
the one tokenisation shared with ``fipo-eval`` and the warm start. The sampler lives in
:mod:`fipo_trainer.data.sampler`; reading and row checks are re-exported here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fipo_trainer.data.config import DataConfig
from fipo_trainer.data.records import (
    SKIP_HINT,
    SUFFIXES,
    DataError,
    check_columns,
    columns_of,
    detect_schema,
    parse_row,
    read_records,
)
from fipo_trainer.data.sampler import ResumableSampler
from fipo_trainer.data.tokenization import encode_prompts, render_prompt, resolve_chat_template

if TYPE_CHECKING:  # loading and checking rows needs no torch (`fipo-train --dry-run`)
    from fipo_trainer.data.batch import Batch

__all__ = [
    "SUFFIXES",
    "DataError",
    "LoadStats",
    "PromptDataset",
    "PromptItem",
    "ResumableSampler",
    "collate_prompts",
    "detect_schema",
    "parse_row",
    "read_records",
]

logger = logging.getLogger(__name__)


@dataclass
class PromptItem:
    """One usable prompt: token ids plus what the reward stage needs."""

    prompt_ids: list[int]
    raw_prompt: list[dict[str, str]]
    data_source: str
    ground_truth: str
    extra_info: dict[str, Any]
    source: str  # "file.parquet:row" for error messages and dumps


@dataclass
class LoadStats:
    """What loading did, so drops are visible in logs and tests."""

    rows_read: int = 0
    kept: int = 0
    skipped_bad: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    first_errors: list[str] = field(default_factory=list)


class PromptDataset:
    """Validated, templated and length-filtered prompts from one or more files."""

    def __init__(
        self,
        files: str | Path | Sequence[str | Path],
        tokenizer: Any,
        config: DataConfig | None = None,
    ) -> None:
        self.config = cfg = config or DataConfig()
        self.tokenizer = tokenizer
        self.files = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
        if not self.files:
            raise ValueError("no data files given (data.train_files / data.val_files is empty)")
        self.use_chat_template = resolve_chat_template(tokenizer, cfg.apply_chat_template)
        self.stats = LoadStats()
        self.items: list[PromptItem] = []
        for path in self.files:
            self._load_file(path)
            if cfg.max_samples is not None and len(self.items) >= cfg.max_samples:
                del self.items[cfg.max_samples :]
                break
        self.stats.kept = len(self.items)
        if self.stats.skipped_bad:
            logger.warning(
                "skipped %d bad rows (data.skip_bad_rows=true); first: %s",
                self.stats.skipped_bad,
                "; ".join(self.stats.first_errors),
            )
        if self.stats.dropped_too_long:
            logger.warning(
                "dropped %d of %d prompts longer than data.max_prompt_length=%d tokens",
                self.stats.dropped_too_long,
                self.stats.rows_read,
                cfg.max_prompt_length,
            )
        if self.stats.truncated:  # the model then sees part of the question: say how often
            logger.warning(
                "cut %d of %d prompts longer than data.max_prompt_length=%d tokens to fit "
                "(data.truncation=%s; filter drops them, error stops)",
                self.stats.truncated,
                self.stats.rows_read,
                cfg.max_prompt_length,
                cfg.truncation,
            )
        if not self.items:
            raise DataError(self._why_empty())

    def _why_empty(self) -> str:
        """Why no prompt is left, with the fix for that cause (a file of no rows is not
        fixed by data.max_prompt_length)."""
        files, cfg, stats = [str(f) for f in self.files], self.config, self.stats
        if not stats.rows_read:
            return (
                f"{files} hold no rows: add rows to the file(s) or point data.train_files / "
                "data.val_files at files that have them"
            )
        why = []
        if stats.dropped_too_long:
            why.append(
                f"{stats.dropped_too_long} longer than data.max_prompt_length="
                f"{cfg.max_prompt_length} tokens (data.truncation=filter): raise "
                "data.max_prompt_length or set data.truncation=left|right"
            )
        if stats.skipped_bad:
            why.append(
                f"{stats.skipped_bad} bad (data.skip_bad_rows=true), first: "
                + "; ".join(stats.first_errors)
            )
        return f"no usable prompts in {files}: of {stats.rows_read} rows, " + (
            "; ".join(why) or "none is usable"
        )

    def _bad(self, err: DataError) -> None:
        if not self.config.skip_bad_rows:
            raise DataError(f"{err} ({SKIP_HINT})") from None
        self.stats.skipped_bad += 1
        if len(self.stats.first_errors) < 3:
            self.stats.first_errors.append(str(err))

    def render(self, messages: list[dict[str, str]]) -> str:
        """Prompt text: chat template + generation prompt, or the contents joined (base models)."""
        return render_prompt(self.tokenizer, messages, self.use_chat_template)

    def _load_file(self, path: Path) -> None:
        cfg = self.config
        records = read_records(path)
        if not records:
            logger.warning("%s holds no rows", path)
            return
        schema = detect_schema(records, cfg, path)
        check_columns(columns_of(records), schema, cfg, path)  # once per file, not per row
        parsed, texts = [], []
        for i, record in enumerate(records):
            self.stats.rows_read += 1
            where = f"{path} row {i}"
            try:
                row = parse_row(record, schema, cfg, where)
                texts.append(self.render(row["raw_prompt"]))
            except DataError as e:
                self._bad(e)
                continue
            row["source"] = f"{path.name}:{i}"
            parsed.append((i, row))
        if not parsed:
            return
        encoded = encode_prompts(
            self.tokenizer, texts, self.use_chat_template, desc=f"tokenizing {path.name}"
        )
        limit = cfg.max_prompt_length
        for (i, row), ids in zip(parsed, encoded):
            if not ids:
                self._bad(DataError(f"{path} row {i}: prompt encodes to 0 tokens"))
                continue
            if len(ids) > limit:
                if cfg.truncation == "filter":
                    self.stats.dropped_too_long += 1
                    continue
                if cfg.truncation == "error":
                    raise DataError(
                        f"{path} row {i}: prompt has {len(ids)} tokens > "
                        f"data.max_prompt_length={limit} (or set data.truncation=filter|left|right)"
                    )
                ids = ids[-limit:] if cfg.truncation == "left" else ids[:limit]
                self.stats.truncated += 1
            self.items.append(PromptItem(prompt_ids=ids, **row))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    def collate(
        self, indices: Sequence[int], *, uid_prefix: str | None = None, pad_to: int | None = None
    ) -> Batch:
        """Left-padded prompt Batch of the given rows (see `collate_prompts`)."""
        return collate_prompts(
            [self.items[i] for i in indices],
            self.tokenizer.pad_token_id,
            uid_prefix=uid_prefix,
            pad_to=pad_to,
        )


def collate_prompts(
    items: Sequence[PromptItem],
    pad_token_id: int | None,
    *,
    uid_prefix: str | None = None,
    pad_to: int | None = None,
) -> Batch:
    """Prompt Batch: left-padded ``input_ids``/``attention_mask``/``position_ids`` tensors plus
    ``uid``/``data_source``/``ground_truth``/``extra_info``/``raw_prompt``/``source`` per row.

    ``uid`` is ``f"{uid_prefix}-{k}"`` (k = position in the batch) or a random UUID. The width
    is the longest prompt, or ``pad_to`` (e.g. max_prompt_length) so that batches of
    different rounds share one width and concatenate without re-padding.
    """
    import torch

    from fipo_trainer.data.batch import Batch

    if not items:
        raise ValueError("cannot collate an empty list of prompts")
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos)")
    width = max(len(it.prompt_ids) for it in items)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({width} tokens)")
        width = pad_to
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for k, it in enumerate(items):
        n = len(it.prompt_ids)
        ids[k, width - n :] = torch.tensor(it.prompt_ids, dtype=torch.long)
        mask[k, width - n :] = 1
    uids = [
        f"{uid_prefix}-{k}" if uid_prefix is not None else str(uuid.uuid4())
        for k in range(len(items))
    ]
    return Batch(
        tensors={
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
        },
        non_tensors={
            "uid": uids,
            "data_source": [it.data_source for it in items],
            "ground_truth": [it.ground_truth for it in items],
            "extra_info": [it.extra_info for it in items],
            "raw_prompt": [it.raw_prompt for it in items],
            "source": [it.source for it in items],
        },
    )
