"""Pure tensor math of the trainer: Future-KL, policy losses, advantages, KL, aggregation.

Nothing here knows about Ray, DeepSpeed or I/O; everything distributed calls into it.
"""

from fipo_trainer.algorithms.advantages import compute_advantage, register_advantage
from fipo_trainer.algorithms.aggregation import aggregate_loss, local_denominator
from fipo_trainer.algorithms.future_kl import future_kl, future_kl_reference
from fipo_trainer.algorithms.policy_loss import (
    PolicyLossConfig,
    compute_policy_loss,
    compute_policy_terms,
    register_policy_loss,
)

__all__ = [
    "PolicyLossConfig",
    "aggregate_loss",
    "compute_advantage",
    "compute_policy_loss",
    "compute_policy_terms",
    "future_kl",
    "future_kl_reference",
    "local_denominator",
    "register_advantage",
    "register_policy_loss",
]
