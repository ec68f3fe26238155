"""Stop a run whose grader keeps failing, instead of training on failure scores.

Why: the reward pool turns every timeout or error into the failure score so that one bad
item never stops training. When most items fail, step after step, the model learns from
nothing but that constant (and the run would still exit 0); the cause is almost always the
reward function or its limits, so the stop message names them and the keys to change.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: TrainerConfig's defaults, for callers whose config predates the keys.
DEFAULT_MAX_FAILED_FRAC = 0.5
DEFAULT_MAX_FAILED_STEPS = 3
_MESSAGE_CHARS = 300


class RewardFailuresExceeded(Exception):
    """Raised by `RewardHealth.record`; the sampler re-raises it as ``TrainingStopped``."""


class RewardHealth:
    """Counts training grading rounds in a row in which >= ``max_failed_frac`` of the
    items timed out or failed; `record` raises once there are ``max_failed_steps`` of them.

    A round is one ``grade`` call of ``Sampler.collect``: one per step unless dynamic
    sampling needs several, which then count one each (a grader that fails everything keeps
    no group, so otherwise a step could go on for max_num_gen_batches rounds, or forever).
    """

    def __init__(
        self,
        max_failed_frac: float = DEFAULT_MAX_FAILED_FRAC,
        max_failed_steps: int = DEFAULT_MAX_FAILED_STEPS,
    ) -> None:
        self.max_failed_frac = float(max_failed_frac)
        self.max_failed_steps = int(max_failed_steps)
        self.streak = 0

    @classmethod
    def from_config(cls, trainer_cfg: Any) -> RewardHealth:
        """From ``cfg.trainer`` (``max_failed_reward_frac``, ``max_failed_reward_steps``)."""
        return cls(
            getattr(trainer_cfg, "max_failed_reward_frac", DEFAULT_MAX_FAILED_FRAC),
            getattr(trainer_cfg, "max_failed_reward_steps", DEFAULT_MAX_FAILED_STEPS),
        )

    def record(self, step: int, result: Any) -> dict[str, float]:
        """Account one grading round's `RewardResult`; its metrics, or raise
        `RewardFailuresExceeded` when the limit is reached."""
        metrics = getattr(result, "metrics", {}) or {}
        total = len(result.scores)
        timeouts = int(metrics.get("reward/timeouts", 0))
        errors = int(metrics.get("reward/errors", 0))
        failed = timeouts + errors
        frac = failed / total if total else 0.0
        if total and frac >= self.max_failed_frac:
            self.streak += 1
            logger.warning(
                "step %d: %d/%d reward items failed (%d timeouts, %d errors); %d/%d failed "
                "rounds in a row before the run stops (trainer.max_failed_reward_steps)",
                step, failed, total, timeouts, errors, self.streak, self.max_failed_steps,
            )  # fmt: skip
        else:
            self.streak = 0
        if self.streak >= self.max_failed_steps:
            raise RewardFailuresExceeded(self.message(step, result, failed, timeouts, errors))
        return {"reward/items": float(total), "reward/failed_streak": float(self.streak)}

    def message(self, step: int, result: Any, failed: int, timeouts: int, errors: int) -> str:
        """Why the run stopped: who failed, how many, how, and what to change."""
        total = len(result.scores)
        failures = getattr(result, "failures", None) or {}
        who = (
            "; ".join(
                f"{name}: {c.get('timeout', 0)} timeouts, {c.get('error', 0)} errors"
                for name, c in failures.items()
            )
            or "the reward function"
        )
        first = next(iter((getattr(result, "errors", None) or {}).items()), None)
        example = f" First failure: item {first[0]}: {first[1][:_MESSAGE_CHARS]}." if first else ""
        hints = ["fix the reward function"]
        if timeouts:
            hints.append("raise reward.timeout_s if it is just slow")
        if errors:
            hints.append("raise reward.max_memory_mb / reward.max_abs_score if those failed")
        return (
            f"step {step}: reward grading failed for {self.streak} rounds in a row "
            f"(trainer.max_failed_reward_steps={self.max_failed_steps}); last round: "
            f"{failed}/{total} items failed ({timeouts} timeouts, {errors} errors), "
            f">= trainer.max_failed_reward_frac={self.max_failed_frac:g}. Failed: {who}."
            f"{example} To go on, {', '.join(hints)}, or raise trainer.max_failed_reward_frac "
            "/ trainer.max_failed_reward_steps to tolerate more failures"
        )
