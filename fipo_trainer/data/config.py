"""Settings of the prompt dataset: how files are read, templated, tokenised and filtered.

Why a slice and not a second config: the training config's ``data`` section
(``TrainDataConfig`` in :mod:`fipo_trainer.trainer.config`) is the one place these values
are set; the trainer builds this loader slice from it with :meth:`DataConfig.from_section`,
which copies every field of the same name, so a new loader setting needs no hand-written
copy. ``fipo-eval`` and ``fipo-data`` build it directly. Sampling (shuffle, seed) is the
sampler's business, not the loader's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SCHEMAS = ("auto", "verl", "raw")
TRUNCATIONS = ("filter", "left", "right", "error")


@dataclass
class DataConfig:
    """How prompt files become token ids.

    ``schema="verl"`` rows carry ``data_source``, ``prompt`` (chat messages),
    ``reward_model.ground_truth`` and ``extra_info``; ``schema="raw"`` rows carry
    ``problem_key``/``answer_key`` columns and are wrapped with ``prompt_template``;
    ``auto`` picks per file from its columns. Prompts longer than ``max_prompt_length``
    tokens are dropped (``filter``), cut keeping the end (``left``) or the start
    (``right``), or refused (``error``).
    """

    prompt_key: str = "prompt"
    schema: str = "auto"
    problem_key: str = "problem"
    answer_key: str = "answer"
    prompt_template: str = "{problem}"
    raw_data_source: str = "math"  # data_source given to raw-schema rows (routes the grader)
    system_prompt: str | None = None  # optional system message for raw-schema rows
    apply_chat_template: bool | None = None  # None: use it when the tokenizer has one
    max_prompt_length: int = 2048
    truncation: str = "filter"
    skip_bad_rows: bool = False
    max_samples: int | None = None  # keep only the first N valid rows (quick runs)

    @classmethod
    def from_section(cls, section: Any) -> DataConfig:
        """The loader slice of a config section (``TrainDataConfig``): every field of this
        class that ``section`` has, by name; the others keep their defaults here."""
        values = {
            f.name: getattr(section, f.name)
            for f in dataclasses.fields(cls)
            if hasattr(section, f.name)
        }
        return cls(**values)

    def __post_init__(self) -> None:
        if self.schema not in SCHEMAS:
            raise ValueError(f"data.schema must be one of {SCHEMAS}, got {self.schema!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(
                f"data.truncation must be one of {TRUNCATIONS}, got {self.truncation!r}"
            )
        if "{problem}" not in self.prompt_template:
            raise ValueError(
                f"data.prompt_template must contain '{{problem}}', got {self.prompt_template!r}"
            )
        if self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"data.max_samples must be >= 1 or null, got {self.max_samples}")
