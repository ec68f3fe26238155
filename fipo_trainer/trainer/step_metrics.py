"""Metrics of one training step, each computed once, from the batch (pure functions).

Which function owns which keys: ``response_metrics`` (response_length/*, prompt_length/*),
``reward_metrics`` (reward/score_*, reward/acc_mean), ``reward_counters`` (the pool's
reward/timeouts, errors, worker_restarts, items summed over a step's rounds, failed_frac,
failed_streak), ``logprob_metrics``
(rollout/actor_logprob_abs_diff, actor/entropy), ``perf_metrics`` (perf/*); ``timed`` adds
timing_s/*. The actor's update reports actor/*, the weight sync sync/*, the sampler
sampling/* and the reward pool's counters.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import numpy as np
import torch

from fipo_trainer.data.batch import Batch
from fipo_trainer.trainer.timeline import STAGE_SPANS
from fipo_trainer.trainer.timeline import now as timeline_clock


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Accumulate wall-clock seconds of a stage into ``timings['timing_s/<name>']`` (and
    into the run's timeline, when one is recorded: ``trainer/timeline.py``)."""
    wall, start = timeline_clock(), time.perf_counter()
    try:
        yield
    finally:
        key, seconds = f"timing_s/{name}", time.perf_counter() - start
        timings[key] = timings.get(key, 0.0) + seconds
        STAGE_SPANS.add(name, wall, seconds)


def non_finite(metrics: dict[str, float], keys: tuple[str, ...]) -> list[str]:
    """Names of ``keys`` whose values are NaN/Inf."""
    return [k for k in keys if k in metrics and not math.isfinite(metrics[k])]


def nonfinite_update(step: int, actor_metrics: dict[str, float]) -> str | None:
    """What is not finite in the update at ``step`` (its loss or gradient norm), or None."""
    bad = non_finite(actor_metrics, ("actor/pg_loss", "actor/grad_norm"))
    if not bad:
        return None
    values = ", ".join(f"{k}={actor_metrics[k]}" for k in bad)
    return f"step {step}: non-finite {', '.join(bad)} ({values})"


def response_metrics(batch: Batch, max_response_length: int) -> dict[str, float]:
    lengths = batch["response_mask"].float().sum(-1)
    prompt_lengths = batch["attention_mask"].float().sum(-1) - lengths
    return {
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": float((lengths >= max_response_length).float().mean()),
        "prompt_length/mean": float(prompt_lengths.mean()),
    }


def reward_metrics(batch: Batch) -> dict[str, float]:
    scores = np.asarray(batch["score"], dtype=np.float64)
    acc = np.asarray(batch["acc"], dtype=np.float64)
    return {
        "reward/score_mean": float(scores.mean()),
        "reward/score_max": float(scores.max()),
        "reward/score_min": float(scores.min()),
        "reward/acc_mean": float(acc.mean()),
    }


_SUMMED_REWARD_COUNTERS = (
    "reward/timeouts",
    "reward/errors",
    "reward/worker_restarts",
    "reward/items",
)


def reward_counters(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The reward pool's counters over a step's generation rounds (each round's metrics).

    Why summed here: per-round values would overwrite each other, and a counter a step does
    not report (worker restarts, before) never reaches metrics.jsonl.
    """
    out = {k: float(sum(r.get(k, 0.0) for r in rounds)) for k in _SUMMED_REWARD_COUNTERS}
    if out["reward/items"]:
        failed = out["reward/timeouts"] + out["reward/errors"]
        out["reward/failed_frac"] = failed / out["reward/items"]
    else:
        del out["reward/items"]
    if rounds and "reward/failed_streak" in rounds[-1]:
        out["reward/failed_streak"] = float(rounds[-1]["reward/failed_streak"])
    return out


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.float()
    return float((values.float() * mask).sum() / mask.sum().clamp(min=1.0))


def logprob_metrics(batch: Batch) -> dict[str, float]:
    """Rollout-vs-actor log-prob mismatch and the policy's entropy, over response tokens.

    Both come from the old-log-prob pass at the training temperature: the engine sampled
    from the same distribution, so the mismatch is numerical noise unless something (the
    temperature, the weights, the kernels) differs between the two.
    """
    mask = batch["response_mask"]
    diff = (batch["rollout_log_probs"] - batch["old_log_probs"]).abs()
    return {
        "rollout/actor_logprob_abs_diff": _token_mean(diff, mask),
        "actor/entropy": _token_mean(batch["entropy"], mask),
    }


def perf_metrics(batch: Batch, seconds: float, n_devices: int) -> dict[str, float]:
    tokens = float(batch["attention_mask"].sum())
    return {
        "perf/step_seconds": seconds,
        "perf/tokens": tokens,
        "perf/throughput_tokens_per_s": tokens / seconds,
        "perf/throughput_tokens_per_s_per_device": tokens / seconds / max(n_devices, 1),
    }
