"""What one grading call returns, and how per-item verdicts become it.

Why apart from the pool: the pool decides *when* an item is done (a verdict, a timeout, a
dead process); turning the verdicts into scores (failure score, overlong shaping) and
metrics is plain bookkeeping a reader should find without the process handling around it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import RewardConfig
from .dapo import INVALID_PRED
from .overlong import overlong_penalties

logger = logging.getLogger("fipo_trainer.rewards.pool")

TIMEOUT_PRED = "[TIMEOUT]"
ERROR_PRED = "[ERROR]"
_LOGGED_FAILURES = 5
#: The dtype scores are used in: advantages are computed from a float32 tensor of them.
SCORE_DTYPE = np.float32
_RESPONSE_PREFIX_CHARS = 80


@dataclass
class RewardResult:
    """Per-item verdicts of one :meth:`RewardPool.grade` call, in input order."""

    scores: list[float]  # grader score + overlong penalty
    acc: list[bool]  # grader verdict (never changed by shaping)
    preds: list[str]
    status: list[str]  # "ok" | "timeout" | "error"
    overlong_penalties: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # item index -> failure message
    #: reward function (see `describe_grader`) -> {"timeout": n, "error": n} of failed items
    failures: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class GradeItems:
    """Some of a grading call's items: their positions in the call and their inputs."""

    indices: Sequence[int]
    responses: Sequence[str]
    ground_truths: Sequence[Any]
    data_sources: Sequence[str]
    response_lengths: Sequence[int] | None = None
    extra_infos: Sequence[Any] | None = None


class StreamedItems:
    """A grading call's inputs, filled in as its parts arrive (``RewardPool.grade_stream``)."""

    def __init__(self, total: int) -> None:
        self.responses: list[Any] = [None] * total
        self.ground_truths: list[Any] = [None] * total
        self.data_sources: list[Any] = [None] * total
        self.response_lengths: list[int] = [0] * total
        self.extra_infos: list[Any] = [None] * total
        self.route: dict[str, str] = {}  # data source -> grader
        self.missing = total

    def add(self, part: GradeItems) -> None:
        for k, i in enumerate(part.indices):
            if self.responses[i] is not None:
                raise ValueError(f"grade_stream(): item {i} came twice")
            self.responses[i] = part.responses[k]
            self.ground_truths[i] = part.ground_truths[k]
            self.data_sources[i] = part.data_sources[k]
            if part.response_lengths is not None:
                self.response_lengths[i] = int(part.response_lengths[k])
            if part.extra_infos is not None:
                self.extra_infos[i] = part.extra_infos[k]
            self.missing -= 1


class Outcome:
    """Per-item results being filled in; ``remaining`` counts items without a verdict,
    ``fresh`` the items given one since ``take_fresh`` last ran."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.remaining = n
        self.scores: list[float] = [0.0] * n
        self.acc: list[bool] = [False] * n
        self.preds: list[str] = [""] * n
        self.status: list[str | None] = [None] * n
        self.errors: dict[int, str] = {}
        self.fresh: list[int] = []

    def ok(self, i: int, score: float, acc: bool, pred: str) -> None:
        self.scores[i], self.acc[i], self.preds[i], self.status[i] = score, acc, pred, "ok"
        self.remaining -= 1
        self.fresh.append(i)

    def fail(self, i: int, status: str, message: str) -> None:
        pred = TIMEOUT_PRED if status == "timeout" else ERROR_PRED
        if self.status[i] is None:
            self.remaining -= 1
            self.fresh.append(i)
        self.acc[i], self.preds[i], self.status[i] = False, pred, status
        self.errors[i] = message

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh


def describe_grader(cfg: RewardConfig, grader: str) -> str:
    """How a message names the reward function: the custom function's path or the grader."""
    if grader == "custom":
        return f"custom function {cfg.custom_function}"
    return f"grader {grader!r}"


def check_scores(
    out: Outcome,
    cfg: RewardConfig,
    indices: Iterable[int],
    grader_of: Callable[[int], str],
    responses: Sequence[str],
    data_sources: Sequence[str],
) -> int:
    """Fail each graded item of ``indices`` whose score is not finite in `SCORE_DTYPE` or
    beyond ``reward.max_abs_score``; returns how many. Why here: 1e39 is a fine float64 but
    inf in the float32 advantages, and the run would later stop blaming the learning rate.
    Such an item is an error, like a non-finite custom score, so it counts towards
    ``trainer.max_failed_reward_frac``. Run on each verdict as it arrives, so a verdict the
    caller sees (``grade_stream``'s ``on_progress``) is final."""
    bound = cfg.max_abs_score
    rejected = 0
    for i in indices:
        status, score = out.status[i], out.scores[i]
        if status != "ok":
            continue
        with np.errstate(over="ignore"):
            finite = math.isfinite(float(SCORE_DTYPE(score)))
        if finite and (bound is None or abs(score) <= bound):
            continue
        why = (
            f"is not finite in {np.dtype(SCORE_DTYPE).name}"
            if not finite
            else f"exceeds reward.max_abs_score={bound:g}"
        )
        out.fail(
            i,
            "error",
            f"{describe_grader(cfg, grader_of(i))} returned score {score:g} for sample {i} "
            f"(data_source {str(data_sources[i])!r}, response "
            f"{responses[i][:_RESPONSE_PREFIX_CHARS]!r}...): it {why}; fix the reward function "
            "or raise reward.max_abs_score",
        )
        rejected += 1
    return rejected


def finish(
    out: Outcome,
    cfg: RewardConfig,
    data_sources: Sequence[str],
    response_lengths: Sequence[int] | None,
    elapsed: float,
    graders: Sequence[str] = (),
) -> RewardResult:
    """Failure scores, overlong shaping and the batch's metrics: the final `RewardResult`."""
    n = out.n
    failures: dict[str, dict[str, int]] = {}
    for i, grader in enumerate(graders):
        if out.status[i] != "ok":
            counts = failures.setdefault(describe_grader(cfg, grader), {"timeout": 0, "error": 0})
            counts[str(out.status[i])] += 1
    for i in range(n):
        if out.status[i] != "ok":
            out.scores[i] = cfg.failure_score
    if cfg.overlong_buffer_enable:
        penalties = overlong_penalties(
            response_lengths,
            cfg.max_response_length,
            cfg.overlong_buffer_len,
            cfg.overlong_penalty_factor,
        )
    else:
        penalties = [0.0] * n
    scores = [s + p for s, p in zip(out.scores, penalties)]

    timeouts = out.status.count("timeout")
    errors = out.status.count("error")
    for i, msg in itertools.islice(out.errors.items(), _LOGGED_FAILURES):
        logger.warning("reward item %d (%s): %s", i, out.status[i], msg)

    metrics: dict[str, float] = {
        "reward/timeouts": float(timeouts),
        "reward/errors": float(errors),
        "reward/grade_time_s": elapsed,
        "reward/items_per_s": n / elapsed if elapsed > 0 else 0.0,
    }
    if n:
        metrics["reward/score_mean"] = sum(scores) / n
        metrics["reward/acc_mean"] = sum(out.acc) / n
        metrics["reward/invalid_frac"] = out.preds.count(INVALID_PRED) / n
        metrics["reward/overlong_penalty_mean"] = sum(penalties) / n
        metrics["reward/overlong_frac"] = sum(p < 0 for p in penalties) / n
        per_source: dict[str, list[bool]] = defaultdict(list)
        for ds, a in zip(data_sources, out.acc):
            per_source[str(ds)].append(a)
        for ds, accs in per_source.items():
            metrics[f"reward/acc/{ds}"] = sum(accs) / len(accs)
    return RewardResult(
        scores=scores,
        acc=list(out.acc),
        preds=list(out.preds),
        status=list(out.status),
        overlong_penalties=penalties,
        metrics=metrics,
        errors=dict(out.errors),
        failures=failures,
    )
