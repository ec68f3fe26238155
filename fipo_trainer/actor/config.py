"""Typed actor settings (DeepSpeed engine, optimizer, PPO batching, policy loss).

Batch sizes follow verl's conventions so recipes translate one to one:
``ppo_mini_batch_size`` counts prompts (x responses per prompt = rows per optimizer step),
``ppo_max_token_len_per_gpu`` is the token budget of one packed micro-batch on one rank.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from fipo_trainer.algorithms.options import PolicyLossConfig, check_policy_loss_name
from fipo_trainer.plugins import import_plugins

logger = logging.getLogger(__name__)

LR_WARMUP_UNITS = ("train_step", "optimizer_step")
LOSS_SCALES = ("reference", "global")


@dataclass
class ActorConfig:
    """Everything the DeepSpeed actor worker needs (defaults: the FIPO 32B recipe)."""

    model_path: str = ""
    tokenizer_path: str | None = None  # default: model_path
    zero_stage: int = 2  # 2 or 3
    # Optimizer: AdamW, linear warm-up over `lr_warmup_steps`, then constant.
    lr: float = 1e-6
    lr_warmup_steps: int = 10
    # What a warm-up step counts. train_step (verl 0.5, the paper): factor s / warmup where s
    # = training steps completed before this one (the first step runs at lr 0), held for
    # every mini-batch of the step. optimizer_step: min(1, (k + 1) / warmup) per optimizer step.
    lr_warmup_unit: str = "optimizer_step"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    gradient_checkpointing: bool = False
    param_offload: bool = False  # GPU only (ignored with a warning on CPU)
    optimizer_offload: bool = False  # GPU only (ignored with a warning on CPU)
    # PPO batching.
    ppo_mini_batch_size: int = 64  # prompts per optimizer step
    ppo_epochs: int = 1
    use_dynamic_bsz: bool = True
    ppo_max_token_len_per_gpu: int = 22528  # packed tokens per micro-batch per rank
    micro_batch_size_per_gpu: int = 4  # rows per micro-batch when use_dynamic_bsz is false
    # Ulysses sequence parallel (verl's name): groups of k consecutive ranks share rows and
    # split each packed micro-batch along the sequence (actor.sequence_parallel).
    ulysses_sequence_parallel_size: int = 1
    # Loss normaliser. reference (verl 0.5, the paper): each micro-batch's loss is its own
    # aggregate x (micro-batch rows / mini-batch rows per rank) with token-budget micro-batches,
    # or / (number of micro-batches) with fixed-size ones. global: the mini-batch-wide
    # normaliser (all micro-batches and ranks; current verl), independent of the cut.
    loss_scale: str = "global"
    # Budget for compute_log_prob; None = the update's, which makes the first mini-batch's
    # log-probs bitwise equal to the old log-probs (ratio == 1 exactly).
    log_prob_max_token_len_per_gpu: int | None = None
    # Policy loss: a name in fipo_trainer.algorithms.options.POLICY_LOSSES + its knobs.
    loss_name: str = "fipo"
    # Files (path/to/losses.py) or modules imported by every actor rank (and the driver)
    # before `loss_name` is looked up, so losses registered there with @register_policy_loss
    # exist where the update runs.
    loss_plugins: list[str] = field(default_factory=list)
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    logits_chunk_size: int = 2048  # rows of the vocab projection processed in fp32 at once
    # Hugging Face config overrides (e.g. {"max_position_embeddings": 32768} for the 7B
    # recipes' context extension), applied identically to the actor and to vLLM.
    override_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dist_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if isinstance(self.policy_loss, dict):
            self.policy_loss = PolicyLossConfig(**self.policy_loss)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad key and the fix."""
        if not self.model_path:
            raise ValueError("actor.model_path is empty: set it to a Hugging Face model directory")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"actor.zero_stage must be 2 or 3, got {self.zero_stage}")
        if not self.lr > 0:
            raise ValueError(f"actor.lr must be > 0, got {self.lr}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"actor.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_warmup_unit not in LR_WARMUP_UNITS:
            raise ValueError(
                f"actor.lr_warmup_unit must be one of {LR_WARMUP_UNITS}, got {self.lr_warmup_unit!r}"
            )
        if self.loss_scale not in LOSS_SCALES:
            raise ValueError(
                f"actor.loss_scale must be one of {LOSS_SCALES} (reference = verl 0.5 / the paper, "
                f"global = micro-batch-invariant), got {self.loss_scale!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"actor.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"actor.betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ValueError(f"actor.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        for key in (
            "ppo_mini_batch_size",
            "ppo_epochs",
            "ppo_max_token_len_per_gpu",
            "micro_batch_size_per_gpu",
            "logits_chunk_size",
            "ulysses_sequence_parallel_size",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"actor.{key} must be >= 1, got {getattr(self, key)}")
        if (
            self.log_prob_max_token_len_per_gpu is not None
            and self.log_prob_max_token_len_per_gpu < 1
        ):
            raise ValueError(
                "actor.log_prob_max_token_len_per_gpu must be >= 1 or null (= the update's budget)"
            )
        import_plugins(self.loss_plugins, "actor.loss_plugins")
        check_policy_loss_name(self.loss_name)  # raises with the registered names
        self.policy_loss.validate()

    @property
    def log_prob_token_budget(self) -> int:
        return self.log_prob_max_token_len_per_gpu or self.ppo_max_token_len_per_gpu

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ActorConfig:
        """Build from a plain/OmegaConf mapping; unknown keys are an error (typos)."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown actor config key(s) {unknown}; known keys: {sorted(known)}")
        if isinstance(values.get("policy_loss"), dict) or hasattr(
            values.get("policy_loss"), "items"
        ):
            pl = dict(values["policy_loss"])
            pl_known = {f.name for f in dataclasses.fields(PolicyLossConfig)}
            bad = sorted(set(pl) - pl_known)
            if bad:
                raise ValueError(
                    f"unknown actor.policy_loss key(s) {bad}; known keys: {sorted(pl_known)}"
                )
            values["policy_loss"] = PolicyLossConfig(**pl)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    @classmethod
    def coerce(cls, value: ActorConfig | dict[str, Any]) -> ActorConfig:
        return value if isinstance(value, cls) else cls.from_dict(value)
