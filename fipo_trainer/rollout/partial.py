"""A generation cut into segments, so weights can change between them (partial rollout).

Why segments instead of pausing requests inside vLLM: an engine call that returns every
``segment_tokens`` tokens gives the trainer a point to load new weights at, with nothing
engine specific kept across it. The next segment re-submits prompt + the tokens so far as
the prompt (the prefix cache makes that cheap), so an unfinished response resumes on the
new weights; every token keeps the weight version that produced it.

All unfinished responses advance in lockstep: after segment s each one has exactly
``s x segment_tokens`` tokens, so one ``max_tokens`` serves the whole call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from fipo_trainer.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutOutput
from fipo_trainer.rollout.config import SEED_MODULUS, SamplingConfig

Generate = Callable[[list[list[int]], SamplingConfig], list[RolloutOutput]]


@dataclasses.dataclass
class _Response:
    prompt_index: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    log_probs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None


def segment_seed(seed: int | None, segment: int) -> int | None:
    """Segment 0 keeps the call's seed (it equals an uncut call's first tokens); segment s
    seeds its unfinished responses in turn from a position hashed from (seed, s).

    Why hashed, not the block after the call's: with short segments a run needs more request
    streams than a 31-bit seed holds (``SEED_MODULUS``; the paper's sizes with
    8-token segments need ~10^11), so later segments cannot all stay apart. Hashed, a shared
    stream is chance, never the same pair of requests call after call, as the blocks' wrap
    (or the old ``seed * 31 + s * 1_000_003``) made it.
    """
    if seed is None or segment == 0:
        return seed
    return int(np.random.SeedSequence([seed, segment]).generate_state(1)[0]) % SEED_MODULUS


class PartialRollout:
    """The responses of one cut generation; :meth:`advance` runs one segment."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        segment_tokens: int,
    ) -> None:
        if segment_tokens < 1:
            raise ValueError(f"segment_tokens must be >= 1, got {segment_tokens}")
        self.prompts = [list(map(int, p)) for p in prompts]
        self.sampling = sampling
        self.segment_tokens = segment_tokens
        self.segment = 0
        self.responses: list[_Response] = []

    @property
    def done(self) -> bool:
        return self.segment > 0 and all(r.finish is not None for r in self.responses)

    def advance(self, generate: Generate, version: int) -> int:
        """Generate the next segment of every unfinished response with ``generate`` (an
        engine's); its tokens are stamped ``version``. Returns the tokens generated."""
        s = self.sampling
        step = min(self.segment_tokens, s.max_tokens - self.segment * self.segment_tokens)
        seed = segment_seed(s.seed, self.segment)
        if self.segment == 0:
            pending = None
            outputs = generate(self.prompts, dataclasses.replace(s, max_tokens=step, seed=seed))
            self.responses = [_Response(o.prompt_index) for o in outputs]
            targets = self.responses
        else:
            targets = [r for r in self.responses if r.finish is None]
            pending = [self.prompts[r.prompt_index] + r.tokens for r in targets]
            outputs = generate(pending, dataclasses.replace(s, n=1, max_tokens=step, seed=seed))
        self.segment += 1
        made = 0
        for response, out in zip(targets, outputs, strict=True):
            response.tokens += out.token_ids
            response.log_probs += out.log_probs
            response.versions += [version] * len(out.token_ids)
            made += len(out.token_ids)
            if out.finish_reason == FINISH_STOP:
                response.finish = FINISH_STOP
            elif len(out.token_ids) < step or len(response.tokens) >= s.max_tokens:
                response.finish = FINISH_LENGTH  # the context or max_tokens ended it
        return made

    def outputs(self) -> list[RolloutOutput]:
        """The whole responses, prompt-major as an uncut ``generate`` returns them."""
        if not self.done:
            raise RuntimeError("PartialRollout.outputs() before every response finished")
        return [
            RolloutOutput(
                r.prompt_index, tuple(r.tokens), tuple(r.log_probs), r.finish, tuple(r.versions)
            )
            for r in self.responses
        ]
