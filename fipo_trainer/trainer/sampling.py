"""Generate + grade + dynamic sampling: ``Sampler.collect(step)`` gives the step's batch.

DAPO's dynamic sampling keeps the uid groups whose ``acc`` varies (a group that is all
right or all wrong has zero advantage and teaches nothing) and generates more rounds until
``data.train_batch_size`` groups or ``algorithm.filter_groups.max_num_gen_batches`` rounds;
the batch is cut to whole mini-batches of groups. Sampling is seeded per (run, step, round),
so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from fipo_trainer.data.batch import Batch
from fipo_trainer.rewards.pool import GradeItems
from fipo_trainer.rollout.config import SEED_MODULUS
from fipo_trainer.rollout.engine_spread import EngineSpread
from fipo_trainer.rollout.group import merge_rollout_metrics
from fipo_trainer.trainer.reward_health import RewardFailuresExceeded, RewardHealth
from fipo_trainer.trainer.settling import BatchSettling, RoundWatch, group_varies
from fipo_trainer.trainer.step_metrics import (
    response_metrics,
    reward_counters,
    reward_metrics,
    timed,
)
from fipo_trainer.trainer.timeline import STAGE_SPANS
from fipo_trainer.trainer.timeline import now as timeline_clock

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss with nan_policy=stop, sampling exhausted,
    the grader failing most items for trainer.max_failed_reward_steps rounds in a row)."""


def step_seed(base: int, step: int, round_: int, *, call_seeds: int, rounds: int) -> int:
    """The first seed of the training call (``step``, ``round_``), from the run seed only.

    A call seeds its requests ``seed, seed + 1, ...``: ``call_seeds`` of them (prompts x n).
    Why blocks: seeds spaced by fixed primes overlapped once a call used more seeds than the
    spacing, so different calls' prompts shared random streams and their samples were
    correlated. Now the calls of a run take disjoint blocks in (step, round) order,
    ``rounds`` (the most a step can have) per step, from an origin hashed from the run seed
    (runs with different seeds start apart). Blocks repeat only after
    ``SEED_MODULUS / call_seeds`` calls (65,535 at the paper's 2048 x 16). Partial rollout's
    later segments seed elsewhere (``rollout.partial.segment_seed``).
    """
    origin = int(np.random.SeedSequence(base).generate_state(1)[0]) % SEED_MODULUS
    index = step * rounds + round_ - 1
    return (origin + index * call_seeds) % SEED_MODULUS


def reward_fields(result: Any) -> Batch:
    """The ``grade`` fields (score, acc, pred) of a reward pool result."""
    return Batch(
        non_tensors={
            "score": np.asarray(result.scores, dtype=object),
            "acc": np.asarray(result.acc, dtype=object),
            "pred": np.asarray(result.preds, dtype=object),
        }
    )


def grade_inputs(batch: Batch) -> tuple[list, list, list, list[int], list | None]:
    """What the grader reads of a rollout batch: responses, ground truths, data sources,
    response lengths (tokens), extra_info."""
    return (
        list(batch["response_text"]),
        list(batch["ground_truth"]),
        list(batch["data_source"]),
        [int(x) for x in batch["response_mask"].sum(-1).tolist()],
        list(batch["extra_info"]) if "extra_info" in batch else None,
    )


def filter_groups(batch: Batch, metric: str) -> tuple[Batch, int, int]:
    """Keep groups whose ``metric`` has non-zero std: (kept rows, groups kept, groups seen).

    Groups stay whole and in order.
    """
    groups = batch.group_indices("uid")
    values = batch[metric]
    keep: list[int] = []
    kept = 0
    for rows in groups.values():
        if group_varies([values[i] for i in rows]):
            keep.extend(rows)
            kept += 1
    return batch[np.asarray(keep, dtype=np.int64)], kept, len(groups)


def take_groups(batch: Batch, n_groups: int) -> Batch:
    """The first ``n_groups`` whole uid groups of a batch."""
    groups = list(batch.group_indices("uid").values())[:n_groups]
    rows = [i for g in groups for i in g]
    return batch[np.asarray(rows, dtype=np.int64)]


def concat_rollouts(batches: list[Batch], pad_token_id: int) -> Batch:
    """Join rollout batches of several generation rounds.

    Each round's prompts are left-padded to that round's longest prompt, so the full
    sequences are left-padded to a common width (responses share ``max_tokens`` already).
    """
    pad = {"input_ids": (pad_token_id, "left"), "attention_mask": (0, "left")}
    return Batch.concat(batches, pad={k: v for k, v in pad.items() if k in batches[0].tensors})


def _nothing() -> None:
    pass


class Sampler:
    """The step's training batch from the prompt source, the rollout role and the grader.

    ``timings`` (timing_s/gen, timing_s/reward) accumulate into the dict given to
    ``collect``; ``last_rollouts`` holds every response of the last step (for dumps).
    ``collect`` stops the run (`RewardHealth`) when most reward items keep failing.
    """

    def __init__(self, cfg: Any, prompts: Any, rollout: Any, reward_pool: Any) -> None:
        self.cfg = cfg
        self.prompts = prompts
        self.rollout = rollout
        self.reward_pool = reward_pool
        self.last_rollouts: Batch | None = None
        self.reward_health = RewardHealth.from_config(cfg.trainer)
        self.last_reward_result: Any = None
        # Async (trainer/pipeline.py): training rounds hold the engines through `turn` one
        # call at a time; partial rollouts generate `partial_rollout_tokens` per call.
        self.turn: Callable[[], AbstractContextManager] = contextlib.nullcontext
        self.partial_rollout_tokens: int | None = None
        # one_step: called once a batch needs no more rounds and its last one is submitted
        self.on_settled: Callable[[], None] = _nothing
        # rollout.engine_spread=auto: how many forked engines each batch uses, measured
        k = int(getattr(cfg.rollout, "engines_per_worker", 1))
        auto = getattr(cfg.rollout, "engine_spread", "auto") == "auto"
        self.engine_spread = EngineSpread(range(1, k + 1)) if k > 1 and auto else None
        self._engines_in_use = k
        self._last_batch_end: float | None = None

    def _engines_for_batch(self) -> int | None:
        """The forked-engine count for the next batch (None: not chosen here)."""
        if self.engine_spread is None:
            return None
        count = self.engine_spread.choose()
        if count != self._engines_in_use:
            with self.turn():
                self.rollout.use_engines(count)
            self._engines_in_use = count
        return count

    def _batch_done(self, count: int | None) -> dict[str, float]:
        """Time the batch since the previous one's end for the chooser; its metrics."""
        now = time.monotonic()
        if count is None:
            return {}
        last, self._last_batch_end = self._last_batch_end, now
        self.engine_spread.record(count, None if last is None else now - last)
        return {"rollout/engines_used": float(count), **self.engine_spread.metrics()}

    def generate_and_grade(
        self,
        prompts: Batch,
        sampling: Any,
        timings: dict[str, float],
        turn: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        partial_rollout_tokens: int | None = None,
        watch: RoundWatch | None = None,
    ) -> tuple[Batch, dict[str, float]]:
        """Generate n responses per prompt and grade them; the batch in prompt order.

        Responses are graded as the engines finish them (``RolloutGroup.generate_stream``
        into ``RewardPool.grade_stream``), so grading hides behind generation: timing_s/gen
        ends when the last response arrived, timing_s/reward runs from the first response
        to the last verdict, timing_s/reward_exposed is the part after generation ended.
        ``watch`` (one_step): sees the verdicts as they come, to settle the batch early
        (``trainer/settling.py``).
        """
        if partial_rollout_tokens:  # cut into segments: graded once whole
            with timed(timings, "gen"):
                batch, metrics = self.rollout.generate_partial(
                    prompts, sampling, segment_tokens=partial_rollout_tokens, turn=turn
                )
            with timed(timings, "reward"), timed(timings, "reward_exposed"), turn():
                result = self.reward_pool.grade(*grade_inputs(batch))
            return self._graded(batch, result, [metrics])
        parts: list[tuple[np.ndarray, Batch, dict[str, float]]] = []
        clock: dict[str, float] = {}

        def arriving() -> Iterator[GradeItems | None]:
            ticks = watch.ticks if watch is not None else None
            for got in self.rollout.generate_stream(prompts, sampling, ticks=ticks):
                if got is None:
                    yield None
                    continue
                rows, part, metrics = got
                if watch is not None:
                    watch.arrived(len(rows))
                clock.setdefault("first", time.perf_counter())
                parts.append((rows, part, metrics))
                yield GradeItems(rows, *grade_inputs(part))
            clock["last"] = time.perf_counter()

        with turn():
            start = time.perf_counter()
            progress = watch.progress if watch is not None else None
            result = self.reward_pool.grade_stream(arriving(), len(prompts) * sampling.n, progress)
            end = time.perf_counter()
        STAGE_SPANS.add("gen", timeline_clock() - (end - start), clock["last"] - start)
        for key, seconds in (
            ("gen", clock["last"] - start),
            ("reward", end - clock["first"]),
            ("reward_exposed", end - clock["last"]),
        ):
            timings[f"timing_s/{key}"] = timings.get(f"timing_s/{key}", 0.0) + seconds
        rows = np.concatenate([r for r, _, _ in parts])
        batch = Batch.concat([p for _, p, _ in parts])[np.argsort(rows, kind="stable")]
        return self._graded(batch, result, [m for _, _, m in parts])

    def _graded(
        self, batch: Batch, result: Any, rollout_metrics: list[dict[str, float]]
    ) -> tuple[Batch, dict[str, float]]:
        batch |= reward_fields(result)
        self.last_reward_result = result
        return batch, {**merge_rollout_metrics(rollout_metrics), **result.metrics}

    def collect(
        self, step: int, timings: dict[str, float] | None = None
    ) -> tuple[Batch | None, dict[str, float]]:
        """Rounds of generate + grade until enough groups; (batch or None, metrics).

        None: not one whole mini-batch of usable groups (the step's update is skipped).
        """
        cfg = self.cfg
        timings = {} if timings is None else timings
        fg = cfg.algorithm.filter_groups
        n = cfg.rollout.n
        target = cfg.data.train_batch_size
        kept: list[Batch] = []
        everything: list[Batch] = []
        stats: list[dict[str, float]] = []
        kept_groups = generated_groups = rounds = 0
        engines = self._engines_for_batch()
        settling = BatchSettling(self.on_settled, n) if self.on_settled is not _nothing else None
        while True:
            if settling and settling.done:  # it would run on the weights given since
                raise RuntimeError(f"step {step}: a round after the batch was settled (a bug)")
            rounds += 1
            prompts = self.prompts.next_batch(
                cfg.data.gen_batch_size, uid_prefix=f"s{step}r{rounds}"
            )
            seed = step_seed(
                cfg.trainer.seed,
                step,
                rounds,
                call_seeds=cfg.data.gen_batch_size * cfg.rollout.n,
                rounds=fg.max_num_gen_batches,
            )
            sampling = dataclasses.replace(cfg.rollout.sampling(), seed=seed)
            last = not fg.enable or 0 < fg.max_num_gen_batches <= rounds
            watch = settling.round(last, target - kept_groups, fg.metric) if settling else None
            batch, round_stats = self.generate_and_grade(
                prompts, sampling, timings, self.turn, self.partial_rollout_tokens, watch
            )
            try:  # validation grades through generate_and_grade too; only training counts
                round_stats |= self.reward_health.record(step, self.last_reward_result)
            except RewardFailuresExceeded as err:
                raise TrainingStopped(str(err)) from None
            stats.append(round_stats)
            everything.append(batch)
            if fg.enable:
                batch_kept, k, seen = filter_groups(batch, fg.metric)
            else:
                batch_kept, k, seen = batch, len(batch) // n, len(batch) // n
            generated_groups += seen
            if k:
                kept.append(batch_kept)
                kept_groups += k
            if not fg.enable or kept_groups >= target:
                break
            if fg.max_num_gen_batches > 0 and rounds >= fg.max_num_gen_batches:
                if fg.on_exhausted == "error":
                    counts = reward_counters(stats)
                    failing = (
                        f" ({counts['reward/timeouts'] + counts['reward/errors']:.0f} of "
                        f"{counts['reward/items']:.0f} reward items failed: check the reward "
                        "function first)"
                        if self.reward_health.streak
                        else ""
                    )
                    raise TrainingStopped(
                        f"dynamic sampling kept {kept_groups}/{target} groups after {rounds} "
                        f"generation rounds (algorithm.filter_groups.max_num_gen_batches="
                        f"{fg.max_num_gen_batches}){failing}; the task is too easy or too hard "
                        "for the model. Raise max_num_gen_batches, or set "
                        "algorithm.filter_groups.on_exhausted=proceed to train on what was kept"
                    )
                break
            logger.info(
                "step %d: %d/%d groups kept after %d rounds", step, kept_groups, target, rounds
            )

        pad_id = self.prompts.dataset.tokenizer.pad_token_id
        self.last_rollouts = concat_rollouts(everything, pad_id)
        metrics = {
            "sampling/gen_rounds": float(rounds),
            "sampling/groups_generated": float(generated_groups),
            "sampling/groups_kept": float(kept_groups),
            "sampling/kept_frac": kept_groups / max(generated_groups, 1),
            "rollout/tokens_per_s": float(
                np.mean([s.get("rollout/tokens_per_s", 0.0) for s in stats])
            ),
            **reward_metrics(self.last_rollouts),
            **reward_counters(stats),
            **response_metrics(self.last_rollouts, cfg.data.max_response_length),
            **self._batch_done(engines),
        }
        usable = min(kept_groups, target)
        usable -= usable % cfg.actor.ppo_mini_batch_size  # whole mini-batches only
        if usable == 0:
            return None, metrics
        metrics["sampling/groups_trained"] = float(usable)
        return take_groups(concat_rollouts(kept, pad_id), usable), metrics
