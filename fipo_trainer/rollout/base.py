"""What every rollout engine provides, so the worker and trainer never see engine specifics.

Log-prob semantics (the same for every engine): ``RolloutOutput.log_probs[t]`` is the
log-prob of ``token_t`` under the distribution it was sampled from, after temperature
(vLLM's ``logprobs_mode="processed_logprobs"``; top-k/top-p masking too, which the training
recipes leave off). The actor computes ``log_softmax(logits / T)`` at the same training
temperature, so the two are directly comparable: the trainer logs their gap
(``rollout/actor_logprob_abs_diff``) and recomputes old log-probs with the actor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from fipo_trainer.rollout.config import SamplingConfig

FINISH_STOP = "stop"  # EOS or a stop token was generated (it is the last token)
FINISH_LENGTH = "length"  # hit max_tokens (or the model's context length)


@dataclass(frozen=True)
class RolloutOutput:
    """One sampled response. ``prompt_index`` points into the ``generate`` input list."""

    prompt_index: int
    token_ids: tuple[int, ...]
    log_probs: tuple[float, ...]
    finish_reason: str
    # The weight version (syncs loaded so far) that produced each token; () = unknown.
    # A partial rollout's tokens can come from several versions.
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.versions and len(self.versions) != len(self.token_ids):
            raise ValueError(
                f"response of prompt {self.prompt_index} has {len(self.token_ids)} tokens "
                f"but {len(self.versions)} weight versions"
            )
        if len(self.token_ids) != len(self.log_probs):
            raise ValueError(
                f"response of prompt {self.prompt_index} has {len(self.token_ids)} tokens "
                f"but {len(self.log_probs)} log-probs"
            )


@runtime_checkable
class RolloutEngine(Protocol):
    """A text generator whose weights the trainer can replace in place.

    ``generate`` returns ``len(prompt_token_ids) * sampling.n`` outputs ordered prompt-major:
    the n responses of prompt i are consecutive and carry ``prompt_index == i``.
    """

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig
    ) -> list[RolloutOutput]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load Hugging Face-named full tensors; returns the number of tensors loaded."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory for a colocated update (no-op where unsupported)."""
        ...

    def wake(self) -> None:
        """Undo ``sleep`` before the next ``generate``."""
        ...

    def shutdown(self) -> None: ...


def prompt_major(parts: Iterable[list[RolloutOutput]]) -> list[RolloutOutput]:
    """A streamed call's parts as ``generate`` returns them: by prompt, n per prompt."""
    return sorted((o for part in parts for o in part), key=lambda o: o.prompt_index)


def check_prompts(
    prompt_token_ids: Sequence[Sequence[int]], vocab_size: int, max_len: int | None
) -> None:
    """Reject empty prompts, out-of-vocabulary ids and over-long prompts with the row number."""
    for i, ids in enumerate(prompt_token_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"prompt {i} has token id {hi if hi >= vocab_size else lo} outside the "
                f"vocabulary [0, {vocab_size}); was it tokenized with another tokenizer?"
            )
        if max_len is not None and len(ids) >= max_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, which leaves no room under "
                f"rollout.max_model_len={max_len}; raise it or lower data.max_prompt_length"
            )
