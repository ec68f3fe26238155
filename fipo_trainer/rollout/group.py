"""The rollout role on the driver: ``RolloutGroup.generate / sleep / wake / shutdown``.

Why generation is not ``WorkerGroup.dispatch_dp``: a worker returns n rows per prompt row.
Prompt rows are cut into consecutive shards (one per worker), so the joined output keeps
prompt order; only the prompt token ids travel to the workers, and the prompt's own fields
(uid, ground truth, ...) are repeated n times here on the driver.

Why generation has its own deadline: how long a ``generate`` may take grows with the
responses a worker makes and their length, so a fixed timeout is either far too short for
the paper recipes or far too long for the quickstart. :class:`GenerationDeadline` derives it
from the call (or takes ``rollout.generate_timeout_s`` as given); every other call waits for
the group's deadline (``trainer.call_timeout_s``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fipo_trainer.cluster.resource_pool import ResourcePool, RolePlacement
from fipo_trainer.cluster.waiting import CallTimeoutError, next_ready_stream, wait_labelled
from fipo_trainer.cluster.worker_group import Deadline, WorkerGroup
from fipo_trainer.data.batch import Batch
from fipo_trainer.rollout.assemble import expand_prompt_fields, generate_inputs, prompt_token_lists
from fipo_trainer.rollout.config import RolloutConfig, SamplingConfig
from fipo_trainer.rollout.worker import RolloutWorker, rollout_config_from

#: A decode step costs at least this many rows' worth of time, however few rows there are
#: (a few long responses still take max_tokens steps).
MIN_DEADLINE_ROWS = 64
#: Parts an engine's share of a generate_stream call is handed out in (graded as they come),
#: at most; fewer for small calls: each part must hold at least MIN_PART_TOKENS (responses x
#: max tokens), as a part's round trip costs ~10 ms. Quickstart (128 x 24 tokens): 4 parts
#: 0.368 s/step, 1 part 0.328 s, 2 ms of grading exposed either way.
STREAM_PARTS = 4
MIN_PART_TOKENS = 8192


def stream_parts(responses: int, max_tokens: int, most: int = STREAM_PARTS) -> int:
    """Parts one engine streams ``responses`` responses of up to ``max_tokens`` in."""
    return max(1, min(most, responses * max_tokens // MIN_PART_TOKENS))


#: The engine shutdown at the end of a run waits at most this long, then the workers go.
SHUTDOWN_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class GenerationDeadline:
    """How long one ``generate`` call may take before the waiting worker is named.

    ``timeout_s`` (``rollout.generate_timeout_s``) is used as given; ``None`` derives it:
    ``max(floor_s, s_per_token x max(rows, MIN_DEADLINE_ROWS) x max_tokens)`` with ``rows``
    the responses of the largest worker shard (``rollout.generate_timeout_floor_s``,
    ``rollout.generate_timeout_s_per_token``).
    """

    timeout_s: float | None = None
    floor_s: float = 120.0
    s_per_token: float = 5e-4

    @classmethod
    def from_config(cls, rollout: Any) -> GenerationDeadline:
        """From a ``rollout`` config section (a plain one, built in code, may lack the keys)."""
        return cls(
            getattr(rollout, "generate_timeout_s", None),
            getattr(rollout, "generate_timeout_floor_s", cls.floor_s),
            getattr(rollout, "generate_timeout_s_per_token", cls.s_per_token),
        )

    def seconds(self, rows: int, max_tokens: int) -> float:
        """The deadline of a call in which one worker makes ``rows`` responses."""
        if self.timeout_s is not None:
            return float(self.timeout_s)
        estimate = self.s_per_token * max(rows, MIN_DEADLINE_ROWS) * max_tokens
        return max(float(self.floor_s), estimate)

    def for_call(self, rows: int, max_tokens: int) -> Deadline:
        """The :class:`Deadline` of that call, saying how it was derived."""
        seconds = self.seconds(rows, max_tokens)
        if self.timeout_s is not None:
            return Deadline(seconds, "rollout.generate_timeout_s")
        note = (
            f"now null = derived {seconds:.0f}s = max(rollout.generate_timeout_floor_s="
            f"{self.floor_s:g}, rollout.generate_timeout_s_per_token={self.s_per_token:g} x "
            f"{max(rows, MIN_DEADLINE_ROWS)} rows x {max_tokens} tokens)"
        )
        return Deadline(seconds, "rollout.generate_timeout_s", note)


def plain_rollout_config(config: RolloutConfig | dict[str, Any]) -> RolloutConfig:
    """The engine's config: a subclass with driver-only keys (the trainer's rollout section
    adds the deadline keys) travels to the workers as a plain `RolloutConfig`."""
    if isinstance(config, RolloutConfig) and type(config) is not RolloutConfig:
        names = [f.name for f in dataclasses.fields(RolloutConfig)]
        return RolloutConfig(**{name: getattr(config, name) for name in names})
    return rollout_config_from(config)


def merge_rollout_metrics(per_worker: Sequence[dict[str, float]]) -> dict[str, float]:
    """One generate call over several workers: counts add up, seconds is the slowest."""
    seconds = max(m["rollout/seconds"] for m in per_worker)
    tokens = sum(m["rollout/response_tokens"] for m in per_worker)
    return {
        "rollout/seconds": seconds,
        "rollout/responses": sum(m["rollout/responses"] for m in per_worker),
        "rollout/response_tokens": tokens,
        "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }


@dataclasses.dataclass(frozen=True)
class PromptShards:
    """A call's prompts cut into one consecutive shard per engine (prompt order kept).

    ``sampling[e]`` is shard e's sampling with the seed shifted by its first row, so an
    engine draws what one engine given the whole call would (``SamplingConfig.for_shard``).
    """

    inputs: list[Batch]
    sampling: list[SamplingConfig]
    first_rows: np.ndarray  # prompt row each shard starts at
    width: int  # one prompt width for every shard
    n: int  # responses per prompt
    max_tokens: int  # per response

    @property
    def rows_per_engine(self) -> int:
        """Responses the largest shard makes (what a call's deadline is sized by)."""
        return max(len(shard) for shard in self.inputs) * self.n


def split_prompts(prompts: Batch, sampling: SamplingConfig, engines: int) -> PromptShards:
    """Cut ``prompts`` across ``engines`` (fewer when there are fewer prompts)."""
    token_lists, width = prompt_token_lists(prompts)
    inputs = generate_inputs(prompts).chunk(min(engines, len(prompts)))
    first_rows = np.cumsum([0] + [len(shard) for shard in inputs])[:-1]
    return PromptShards(
        inputs=inputs,
        sampling=[sampling.for_shard(first) for first in first_rows],
        first_rows=first_rows,
        width=width or max(len(p) for p in token_lists),
        n=sampling.n,
        max_tokens=sampling.max_tokens,
    )


class RolloutGroup:
    """``world_size`` engines behind one object; an engine is ``tensor_parallel_size`` = k
    consecutive rollout workers (one TP rank each, one device each).

    ``generation`` bounds each ``generate`` call; ``deadline`` every other call. The k ranks
    of an engine get the same prompts (vLLM's external launcher is SPMD) and TP rank 0's
    output is kept. ``wait=False``: start the workers, :meth:`wait_ready` later.
    """

    def __init__(
        self,
        model_path: str | Path,
        config: RolloutConfig | dict[str, Any],
        world_size: int,
        *,
        pool: ResourcePool | RolePlacement | None = None,
        name: str = "rollout",
        num_cpus_per_worker: float | None = None,
        num_gpus_per_worker: float | None = None,
        startup_timeout_s: float = 600.0,
        deadline: Deadline | None = None,
        generation: GenerationDeadline | None = None,
        wait: bool = True,
    ) -> None:
        self.config = plain_rollout_config(config)
        self.generation = generation or GenerationDeadline()
        self.engines = world_size
        self.tp = self.config.tensor_parallel_size
        self._workers = WorkerGroup(
            RolloutWorker,
            world_size * self.tp,
            init_kwargs={"model_path": str(model_path), "config": self.config},
            pool=pool,
            name=name,
            num_cpus_per_worker=num_cpus_per_worker,
            num_gpus_per_worker=num_gpus_per_worker,
            startup_timeout_s=startup_timeout_s,
            deadline=deadline,
            wait=False,
        )
        self._startup_timeout_s = startup_timeout_s
        self._engines_started = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the workers (and build TP engines) of a group built with ``wait=False``
        (idempotent): the trainer starts them with the actor ranks and waits once."""
        self._workers.wait_ready()
        if self.tp > 1 and not self._engines_started:
            try:
                self._start_tp_engines(self._startup_timeout_s)
            except BaseException:
                self._workers.shutdown()
                raise
        self._engines_started = True

    def _start_tp_engines(self, timeout_s: float) -> None:
        """Each engine's k ranks rendezvous at its TP rank 0's node and build together."""
        k = self.tp
        firsts = [e * k for e in range(self.engines)]
        masters = [self._workers.call_rank(rank, RolloutWorker.engine_endpoint) for rank in firsts]
        self._workers.scatter(
            RolloutWorker.start_engine,
            [(r % k, masters[r // k]) for r in range(self._workers.world_size)],
            deadline=Deadline(timeout_s),
        )

    @property
    def worker_group(self) -> WorkerGroup:
        """The workers, for cluster plumbing (``cluster.weight_sync.WeightSync``) only."""
        return self._workers

    @property
    def world_size(self) -> int:
        """Engine ranks (workers): engines x tensor_parallel_size."""
        return self._workers.world_size

    def _split(
        self, prompts: Batch, sampling: SamplingConfig | None, validate: bool, what: str
    ) -> PromptShards:
        """The call's prompts cut across the engines, with the sampling the call resolves to
        (``None``: the config's training block; ``validate=True``: its val block)."""
        if len(prompts) == 0:
            raise ValueError(f"RolloutGroup.{what} got an empty prompt batch")
        resolved = sampling or (self.config.val_sampling() if validate else self.config.sampling())
        return split_prompts(prompts, resolved, self.engines)

    def generate(
        self, prompts: Batch, sampling: SamplingConfig | None = None, *, validate: bool = False
    ) -> tuple[Batch, dict[str, float]]:
        """n responses per prompt row (consecutive, in prompt order) and ``rollout/*`` metrics.

        The batch holds the ``generate`` fields plus the prompt fields (``data/schema.py``).
        ``sampling=None``: the config's training block (``validate=True``: its val block).
        """
        split = self._split(prompts, sampling, validate, "generate")
        k = self.tp
        results = self._workers.scatter(
            RolloutWorker.generate_batch,
            [(split.inputs[r // k], split.sampling[r // k]) for r in range(len(split.inputs) * k)],
            deadline=self.generation.for_call(split.rows_per_engine, split.max_tokens),
            validate=validate,
            prompt_width=split.width,
        )[::k]
        out = Batch.concat([batch for batch, _ in results])
        n = len(out) // len(prompts)
        out |= expand_prompt_fields(prompts, n)
        return out, merge_rollout_metrics([m for _, m in results])

    def generate_stream(
        self,
        prompts: Batch,
        sampling: SamplingConfig | None = None,
        *,
        validate: bool = False,
        parts_per_engine: int = STREAM_PARTS,
        ticks: Callable[[], Sequence[float]] | None = None,
    ) -> Iterator[tuple[np.ndarray, Batch, dict[str, float]] | None]:
        """:meth:`generate` handed out as the engines finish prompts: parts of
        (the rows these responses take in :meth:`generate`'s output, their batch with the
        prompt fields, ``rollout/*`` metrics so far). A part holds whole prompts (n rows
        each); the parts of all engines cover every row once. Bounded by the call's
        generation deadline. With ``ticks``: also None once every call is submitted, and
        after each part at each of the waits ``ticks()`` then gives (seconds) with no next
        part: the caller looks at what it does with the parts (e.g. their verdicts)."""
        split = self._split(prompts, sampling, validate, "generate_stream")
        n, k = split.n, self.tp
        deadline = self.generation.for_call(split.rows_per_engine, split.max_tokens)
        kwargs = {"validate": validate, "prompt_width": split.width}
        streams = {}
        others = []  # TP ranks > 0 run the same steps (SPMD); only rank 0's output is kept
        for e, (shard, mine) in enumerate(zip(split.inputs, split.sampling)):
            parts = stream_parts(len(shard) * n, split.max_tokens, parts_per_engine)
            chunk = max(1, math.ceil(len(shard) / parts))
            gen = self._workers.stream(
                e * k, RolloutWorker.generate_stream, shard, mine, chunk_prompts=chunk, **kwargs
            )
            streams[gen] = e
            others += self._workers.submit(RolloutWorker.generate_batch, shard, mine,
                                           ranks=range(e * k + 1, e * k + k), **kwargs)  # fmt: skip
        start = time.monotonic()
        if ticks is not None:
            yield None
        waits = list(ticks()) if ticks else []
        while streams:
            labels = {gen: self._workers.label(e * k) for gen, e in streams.items()}
            try:
                wait_s = waits.pop(0) if waits else None
                gen = next_ready_stream(labels, others, start, deadline, wait_s)
            except CallTimeoutError as err:
                raise self._workers.with_stacks(err) from None
            if gen is None:
                yield None
                continue
            e = streams[gen]
            try:
                ref = next(gen)
            except StopIteration:
                del streams[gen]
                continue
            label = self._workers.label(e * k)
            rows, part, metrics = wait_labelled([(label, ref)], what="generate_stream")[0]
            prompt_rows = split.first_rows[e] + np.asarray(rows, dtype=np.int64)
            part |= expand_prompt_fields(prompts[prompt_rows], n)
            yield (prompt_rows[:, None] * n + np.arange(n)).reshape(-1), part, metrics
            waits = list(ticks()) if ticks else []
        if others:
            wait_labelled(others, what="generate_batch", timeout_s=deadline.seconds,
                          timeout_key=deadline.key)  # fmt: skip

    def generate_partial(
        self,
        prompts: Batch,
        sampling: SamplingConfig | None = None,
        *,
        segment_tokens: int,
        turn: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> tuple[Batch, dict[str, float]]:
        """:meth:`generate`, cut into engine calls of ``segment_tokens`` tokens, each made
        while holding ``turn()``: a weight sync between two calls reaches the unfinished
        responses (``rollout.partial``); every token keeps the version that produced it."""
        split = self._split(prompts, sampling, False, "generate_partial")
        k = self.tp
        ranks = list(range(len(split.inputs) * k))
        with turn():
            self._workers.scatter(
                RolloutWorker.start_partial,
                [(split.inputs[r // k], split.sampling[r // k]) for r in ranks],
                segment_tokens=segment_tokens,
                prompt_width=split.width,
            )
        deadline = self.generation.for_call(split.rows_per_engine, segment_tokens)
        results: dict[int, tuple[Batch, dict[str, float]]] = {}
        while len(results) < len(split.inputs):
            pending = [r for r in ranks if r // k not in results]
            with turn():
                answers = self._workers.call_all(
                    RolloutWorker.continue_partial, deadline=deadline, ranks=pending
                )
            for rank, answer in zip(pending, answers):
                if answer is not None and rank % k == 0:
                    results[rank // k] = answer
        parts = [results[e] for e in range(len(split.inputs))]
        out = Batch.concat([batch for batch, _ in parts])
        out |= expand_prompt_fields(prompts, len(out) // len(prompts))
        return out, merge_rollout_metrics([m for _, m in parts])

    def load_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[dict]:
        """Hand tensors to every engine directly (through the Ray object store)."""
        return self._workers.call_all(RolloutWorker.update_weights, list(named_tensors))

    def set_weights_version(self, version: int) -> None:
        """Number the weights the engines hold (stamped on every token they generate next)."""
        self._workers.call_all(RolloutWorker.set_weights_version, int(version))

    def use_engines(self, count: int) -> None:
        """Training calls use ``count`` of each worker's forked engines (``engine_spread``)."""
        self._workers.call_all(RolloutWorker.use_engines, int(count))

    def sleep(self) -> None:
        """Release the engines' memory (colocated: the actor needs it); the sync wakes them."""
        self._workers.call_all(RolloutWorker.sleep)

    def wake(self) -> None:
        self._workers.call_all(RolloutWorker.wake)

    def shutdown(self, *, graceful: bool = True) -> None:
        """Stop the engines (best effort, ``SHUTDOWN_TIMEOUT_S`` at most), then the worker
        processes. ``graceful=False`` (Ctrl-C, or after a failure that may be a worker's)
        only kills the processes: a stalled worker would not answer."""
        if graceful:
            limit = self._workers.deadline.seconds
            seconds = SHUTDOWN_TIMEOUT_S if limit is None else min(limit, SHUTDOWN_TIMEOUT_S)
            with contextlib.suppress(Exception):
                self._workers.call_all(RolloutWorker.shutdown, deadline=Deadline(seconds))
        self._workers.shutdown()
