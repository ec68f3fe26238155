"""Prompts for the loop: a dataset, a resumable sampler that crosses epochs, and collation.

Why its own object: dynamic sampling draws a variable number of prompt batches per step, so
the loop asks for "the next N prompts" rather than iterating a DataLoader; epochs roll over
inside `next_batch`, and the (epoch, position) state makes resume exact, including at an
epoch boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fipo_trainer.data.batch import Batch, to_object_array
from fipo_trainer.trainer.config import BUILTIN_PREFIX, TrainConfig


class PromptSource:
    """Tokenized prompts + a seeded per-epoch shuffle with (epoch, position) state."""

    def __init__(self, rows: Sequence[dict[str, Any]], *, shuffle: bool, seed: int) -> None:
        if not rows:
            raise ValueError("the prompt dataset is empty (check data.train_files / data.val_files)")
        self.rows = list(rows)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    # ----------------------------------------------------------------- construction
    @classmethod
    def for_training(cls, cfg: TrainConfig) -> PromptSource:
        return cls(_load_rows(cfg, "train"), shuffle=cfg.data.shuffle, seed=cfg.data.seed)

    @classmethod
    def for_validation(cls, cfg: TrainConfig) -> PromptSource:
        return cls(_load_rows(cfg, "val"), shuffle=False, seed=cfg.data.seed)

    def __len__(self) -> int:
        return len(self.rows)

    # ----------------------------------------------------------------- sampling
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next_indices(self, size: int) -> list[int]:
        """The next `size` dataset indices, rolling into the next epoch when one ends."""
        out: list[int] = []
        while len(out) < size:
            if self.position >= len(self.rows):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(size - len(out), len(self.rows) - self.position)
            out.extend(int(i) for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def next_batch(self, size: int, uid_prefix: str) -> Batch:
        return self.collate(self.next_indices(size), uid_prefix)

    def all_prompts(self, uid_prefix: str) -> Batch:
        return self.collate(list(range(len(self.rows))), uid_prefix)

    def collate(self, indices: Sequence[int], uid_prefix: str) -> Batch:
        rows = [self.rows[i] for i in indices]
        non_tensors = {
            "prompt_token_ids": to_object_array([r["prompt_token_ids"] for r in rows]),
            "raw_prompt": to_object_array([r["raw_prompt"] for r in rows]),
            "data_source": to_object_array([r["data_source"] for r in rows]),
            "ground_truth": to_object_array([r["ground_truth"] for r in rows]),
            "extra_info": to_object_array([r.get("extra_info") or {} for r in rows]),
            "uid": to_object_array([f"{uid_prefix}-{i}" for i in indices]),
        }
        return Batch({}, non_tensors, {})

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("size", len(self)) != len(self):
            raise ValueError(
                f"the checkpoint's sampler saw {state['size']} prompts but the dataset now has "
                f"{len(self)}: resume with the same data.train_files (or trainer.resume=disable)"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._epoch_order(self.epoch)


def _load_rows(cfg: TrainConfig, split: str) -> list[dict[str, Any]]:
    """verl-schema rows → dicts with tokenized prompts (chat template + generation prompt)."""
    from transformers import AutoTokenizer

    from fipo_trainer.data.synthetic import ArithmeticTask, make_rows

    data = cfg.data
    files = data.train_files if split == "train" else data.val_files
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    raw: list[dict[str, Any]] = []
    for spec in files:
        if str(spec).startswith(BUILTIN_PREFIX):
            syn = data.synthetic
            n = syn.num_train if split == "train" else syn.num_val
            seed = syn.seed if split == "train" else syn.seed + 1
            raw.extend(make_rows(n, seed=seed, task=ArithmeticTask(digits=syn.digits), split=split))
        else:
            import pandas as pd

            frame = pd.read_json(spec, lines=True) if str(spec).endswith(".jsonl") else pd.read_parquet(spec)
            raw.extend(frame.to_dict("records"))
    rows = []
    for r in raw:
        messages = [dict(m) for m in r[data.prompt_key]]
        if data.apply_chat_template and tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        ids = list(ids)
        if len(ids) > data.max_prompt_length:
            ids = ids[-data.max_prompt_length :]
        rows.append(
            {
                "prompt_token_ids": ids,
                "raw_prompt": messages[-1]["content"],
                "data_source": r["data_source"],
                "ground_truth": r["reward_model"]["ground_truth"],
                "extra_info": r.get("extra_info") or {},
            }
        )
    return rows
