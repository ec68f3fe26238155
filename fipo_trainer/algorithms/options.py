"""What a config may choose among the algorithms, importable without torch.

Why: ``fipo-train`` validates its whole config before Ray starts, and then imports torch
while Ray starts (``fipo_trainer.startup.import_in_background``); the checks therefore
need the names of the losses, estimators and modes, the policy-loss knobs and the
rollout-correction threshold rule without the tensor modules that implement them. The
registries live here too, so a loss of your own registered by a plugin file is known to the
checks; the built-in ones register when their modules are imported, under the names below
(``tests/unit/test_algorithm_options.py`` keeps the two in step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
BUILTIN_POLICY_LOSSES = ("fipo", "vanilla")
BUILTIN_ADVANTAGES = ("grpo", "reinforce_plus_plus_baseline", "rloo")

# name -> function; filled by @register_policy_loss / @register_advantage
POLICY_LOSSES: dict[str, Callable[..., Any]] = {}
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Any]] = {}

Fn = TypeVar("Fn", bound=Callable[..., Any])

CORRECTION_LEVELS = ("token", "sequence")
DEFAULT_CORRECTION_THRESHOLD = 2.0


def _register(
    registry: dict[str, Callable[..., Any]], kind: str, name: str
) -> Callable[[Fn], Fn]:
    def decorator(fn: Fn) -> Fn:
        existing = registry.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"{kind} {name!r} is already registered ({existing.__qualname__})")
        registry[name] = fn
        return fn

    return decorator


def register_policy_loss(name: str) -> Callable[[Fn], Fn]:
    """Decorator: make `fn(old_log_prob, log_prob, advantages, response_mask, config)` a loss."""
    return _register(POLICY_LOSSES, "policy loss", name)


def register_advantage(name: str) -> Callable[[Fn], Fn]:
    """Decorator: make `fn(scores, response_mask, group_ids, **kwargs)` an estimator."""
    return _register(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def policy_loss_names() -> list[str]:
    """Every loss a config may name: the built-in ones and those registered so far."""
    return sorted({*BUILTIN_POLICY_LOSSES, *POLICY_LOSSES})


def advantage_names() -> list[str]:
    """Every estimator a config may name: the built-in ones and those registered so far."""
    return sorted({*BUILTIN_ADVANTAGES, *ADVANTAGE_ESTIMATORS})


def check_policy_loss_name(name: str) -> None:
    """Raise ValueError naming the losses there are."""
    if name not in policy_loss_names():
        raise ValueError(
            f"unknown policy loss {name!r}; registered: {policy_loss_names()} "
            "(set actor.loss_name, or register one with @register_policy_loss)"
        )


@dataclass
class PolicyLossConfig:
    """Hyper-parameters of the policy losses (defaults: the FIPO 32B recipe)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    loss_agg_mode: str = "token-mean"
    decay_rate: float = 32.0
    future_kl_clip_ratio: float = 0.2
    future_kl_clip_high_only: bool = True
    safety_thresh: float = 10.0
    # §1.2 participation mask (ratio <= c) of Future-KL; false = every response token
    # participates (the paper's ablation: training collapses near step 70 without it).
    participation_filter: bool = True
    # Constant length for "seq-mean-token-sum-norm" (Dr. GRPO); None = the tensor's length.
    loss_norm_length: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending key and the fix."""
        for key in ("clip_ratio_low", "clip_ratio_high", "future_kl_clip_ratio"):
            if getattr(self, key) < 0:
                raise ValueError(f"policy_loss.{key} must be >= 0, got {getattr(self, key)}")
        if self.clip_ratio_low >= 1:
            raise ValueError(
                f"policy_loss.clip_ratio_low must be < 1 (ratio clip floor 1 - eps), got {self.clip_ratio_low}"
            )
        if not self.clip_ratio_c > 1:
            raise ValueError(
                f"policy_loss.clip_ratio_c (dual-clip constant c) must be > 1, got {self.clip_ratio_c}; "
                "the recipes use 10.0"
            )
        if not self.decay_rate > 0:
            raise ValueError(
                f"policy_loss.decay_rate (Future-KL half-life in tokens) must be > 0, got {self.decay_rate}"
            )
        if not self.safety_thresh > 0:
            raise ValueError(f"policy_loss.safety_thresh must be > 0, got {self.safety_thresh}")
        if not self.future_kl_clip_high_only and self.future_kl_clip_ratio >= 1:
            raise ValueError(
                "policy_loss.future_kl_clip_ratio must be < 1 with future_kl_clip_high_only=false "
                f"(the lower bound 1 - ratio would be <= 0), got {self.future_kl_clip_ratio}"
            )
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(
                f"policy_loss.loss_agg_mode {self.loss_agg_mode!r} is unknown; choose one of {AGG_MODES}"
            )
        if self.loss_norm_length is not None and not self.loss_norm_length > 0:
            raise ValueError(
                f"policy_loss.loss_norm_length must be > 0, got {self.loss_norm_length}"
            )


def parse_threshold(threshold: float | str | Sequence[float]) -> tuple[float | None, float]:
    """A rollout-correction threshold as ``(lower, upper)``: lower is None for truncated IS
    (one number), a float for IcePop.

    Accepted: a number (TIS upper bound), a string holding one (``"2.0"``), a string
    ``"lower_upper"`` (``"0.5_2.0"``) or a two-element list/tuple (IcePop). Raises
    ValueError: the bounds must keep the on-policy ratio 1 — TIS needs upper >= 1, IcePop
    0 <= lower < upper with lower <= 1 <= upper.
    """
    if isinstance(threshold, bool):
        raise ValueError(f"threshold must be a number or 'lower_upper', got {threshold!r}")
    if isinstance(threshold, str):
        parts = threshold.strip().split("_")
        if len(parts) not in (1, 2):
            raise ValueError(f"threshold {threshold!r} must be one number or 'lower_upper'")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"threshold {threshold!r} must be one number or 'lower_upper' (e.g. '0.5_2.0')"
            ) from None
    elif isinstance(threshold, (int, float)):
        values = [float(threshold)]
    else:
        values = [float(v) for v in threshold]
        if len(values) != 2:
            raise ValueError(f"threshold pair must have 2 values (lower, upper), got {threshold!r}")
    if len(values) == 1:
        if not values[0] >= 1:  # also catches Hydra's reading of an unquoted 0.5_2 as 0.52
            raise ValueError(
                f"threshold (TIS upper bound) must be >= 1 (the on-policy ratio), got "
                f"{values[0]}; IcePop bounds are written [0.5,2.0] or '0.5_2.0'"
            )
        return None, values[0]
    lower, upper = values
    if not (0 <= lower < upper and lower <= 1 <= upper):
        raise ValueError(
            f"threshold IcePop bounds need 0 <= lower < upper and lower <= 1 <= upper, "
            f"got {lower}, {upper}"
        )
    return lower, upper
