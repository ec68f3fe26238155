"""What one grading call returns, and how per-item verdicts become it.

Why apart from the pool: the pool decides *when* an item is done (a verdict, a timeout, a
dead process); turning the verdicts into scores (failure score, overlong shaping) and
metrics is plain bookkeeping a reader should find without the process handling around it.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from .config import RewardConfig
from .dapo import INVALID_PRED
from .overlong import overlong_penalties

logger = logging.getLogger("fipo_trainer.rewards.pool")

TIMEOUT_PRED = "[TIMEOUT]"
ERROR_PRED = "[ERROR]"
_LOGGED_FAILURES = 5


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


class Outcome:
    """Per-item results being filled in; ``remaining`` counts items without a verdict."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.remaining = n
        self.scores: list[float] = [0.0] * n
        self.acc: list[bool] = [False] * n
        self.preds: list[str] = [""] * n
        self.status: list[str | None] = [None] * n
        self.errors: dict[int, str] = {}

    def ok(self, i: int, score: float, acc: bool, pred: str) -> None:
        self.scores[i], self.acc[i], self.preds[i], self.status[i] = score, acc, pred, "ok"
        self.remaining -= 1

    def fail(self, i: int, status: str, message: str) -> None:
        pred = TIMEOUT_PRED if status == "timeout" else ERROR_PRED
        self.acc[i], self.preds[i], self.status[i] = False, pred, status
        self.errors[i] = message
        self.remaining -= 1


def finish(
    out: Outcome, cfg: RewardConfig, data_sources, response_lengths, elapsed: float
) -> RewardResult:
    """Failure scores, overlong shaping and the batch's metrics: the final `RewardResult`."""
    n = out.n
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
    )
