"""Rewards: DAPO's rule, math-verify, user functions, overlong shaping, and a safe grading pool.

``from fipo_trainer.rewards import RewardConfig, RewardPool``; the graders themselves are
``fipo_trainer.rewards.dapo.compute_score`` and ``fipo_trainer.rewards.math_verify.compute_score``
(the latter imports sympy, so it is not imported here).
"""

from .config import RewardConfig
from .custom import load_custom_function
from .overlong import overlong_penalties, overlong_penalty
from .pool import RewardPool, RewardResult

__all__ = [
    "RewardConfig",
    "RewardPool",
    "RewardResult",
    "load_custom_function",
    "overlong_penalties",
    "overlong_penalty",
]
