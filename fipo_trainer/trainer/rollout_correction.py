"""The rollout-correction stage of a training step, on the driver (pure).

Why here and not in the actor: the weights depend only on the rollout log-probs (from the
engine) and the old log-probs (the actor's pass at the start of the update), both in the
batch before the update starts. Computed once over whole rows, a sequence-level weight is
the whole response's ratio even when Ulysses sequence parallel later cuts the row across
ranks; the actor only multiplies its per-token loss by the ``rollout_is_weights`` field.
"""

from __future__ import annotations

from typing import Any

from fipo_trainer.algorithms.rollout_correction import compute_rollout_correction_weights
from fipo_trainer.data.batch import Batch

__all__ = ["rollout_as_old_log_probs", "rollout_correction"]


def rollout_correction(
    batch: Batch, metrics: dict[str, float], algorithm: Any
) -> tuple[Batch, dict[str, float]]:
    """``batch`` plus ``rollout_is_weights`` (only with ``rollout_correction.enable``) and
    ``metrics`` plus the ``rollout_corr/*`` mismatch metrics (always, at the section's
    level and threshold)."""
    rc = algorithm.rollout_correction
    log_ratio = batch["old_log_probs"].float() - batch["rollout_log_probs"].float()
    weights, rc_metrics = compute_rollout_correction_weights(
        log_ratio, batch["response_mask"], rc.level, rc.threshold
    )
    metrics = {**metrics, **rc_metrics}
    if rc.enable:
        batch = batch | Batch({"rollout_is_weights": weights})
    return batch, metrics


def rollout_as_old_log_probs(batch: Batch) -> Batch:
    """Bypass mode (``algorithm.rollout_correction.bypass_mode``, verl's name): the engine's
    log-probs stand in for the actor's old-log-prob pass, saving a forward pass over the batch
    and a round trip per step. Exact up to the engine/actor numerical gap, which the config
    rules confine to on-policy, untruncated sampling; then π_old / π_rollout = 1, so there is
    no mismatch to measure or correct (no ``rollout_corr/*``, no ``actor/entropy``)."""
    return Batch({"old_log_probs": batch["rollout_log_probs"]})
