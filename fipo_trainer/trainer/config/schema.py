"""The typed schema of `fipo-train`'s config: one dataclass per section, each checking itself.

Why here and nowhere else: `configs/config.yaml` is composed on top of `TrainConfig`
(registered in Hydra's ConfigStore as ``train_schema``), so a typo or a wrong type fails at
composition, and `OmegaConf.to_object` turns the composed tree into these classes. A section's
``validate()`` checks only its own fields and raises `ConfigError` with every problem it
finds (messages name the full key and the fix); rules that relate two sections live in
`rules.py`, checks against the machine in `environment.py`. The trainer's own sections
(model, algorithm, trainer, resources) are in `sections.py`.

Component sections reuse the components' own dataclasses: `RewardConfig` (and
`PolicyLossConfig` inside the actor) as they are; the rollout section extends `RolloutConfig`
with the driver's generation deadline keys, the actor section extends
`ActorConfig` with the trainer-level keys, and its ``__post_init__`` only coerces (the schema
needs a default instance; `ActorConfig` refuses an empty model path on construction). The
data section is the one data config: the dataset loader takes its slice by field name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.algorithms.options import PolicyLossConfig
from fipo_trainer.data.config import DataConfig
from fipo_trainer.rewards.config import RewardConfig
from fipo_trainer.rollout.config import RolloutConfig
from fipo_trainer.trainer.config.errors import ConfigError, _raise
from fipo_trainer.trainer.config.sections import (
    AlgorithmConfig,
    ModelConfig,
    ResourcesConfig,
    SyntheticDataConfig,
    TrainerConfig,
)

SCHEMA_NAME = "train_schema"
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("arithmetic",)
#: Advantage estimators that normalise within a prompt's group (need n >= 2).
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline")


# --------------------------------------------------------------------------- data


@dataclass
class TrainDataConfig:
    """Datasets (verl schema: parquet or jsonl), their loading, and batch sizes in prompts.

    The one data config: the dataset loader reads its slice (`DataConfig.from_section`, the
    fields of the same name) and checks it; the files, response length, batch sizes and the
    sampler's ``shuffle``/``seed`` are the trainer's.
    """

    train_files: list[str] = field(default_factory=list)  # or "builtin:arithmetic"
    val_files: list[str] = field(default_factory=list)
    # Base directory the recipes write their file names under (``data.data_dir=...``).
    data_dir: str = "data"
    prompt_key: str = "prompt"  # column with the chat messages
    apply_chat_template: bool = True  # tokenizer chat template + generation prompt
    truncation: str = "left"  # filter | left | right | error (prompts > max_prompt_length)
    schema: str = "auto"  # auto | verl | raw (problem/answer columns + prompt_template)
    problem_key: str = "problem"
    answer_key: str = "answer"
    prompt_template: str = "{problem}"
    skip_bad_rows: bool = False  # skip malformed rows (counted and logged) instead of failing
    max_samples: int | None = None  # keep the first N valid rows of each split (quick runs)
    max_prompt_length: int = 2048
    max_response_length: int = 20480  # rollout.max_tokens and reward.max_response_length
    train_batch_size: int = 512  # prompts per step (groups kept after dynamic sampling)
    gen_batch_size: int = 512  # prompts per generation round
    shuffle: bool = True
    seed: int = 0
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def validate(self) -> None:
        errors: list[str] = []
        try:  # the loader's own rules, on the slice it will read
            self.dataset_config()
        except ValueError as err:
            errors.append(str(err))
        for key in (
            "train_batch_size",
            "gen_batch_size",
            "max_prompt_length",
            "max_response_length",
        ):
            if getattr(self, key) < 1:
                errors.append(f"data.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("train_files", "val_files"):  # a run validates, and checks the val set
            if not getattr(self, key):
                errors.append(
                    f"data.{key} is empty: list parquet/jsonl files (verl schema) or "
                    "'builtin:arithmetic'"
                )
        for key in ("train_files", "val_files"):
            for name in getattr(self, key):
                builtin = str(name)[len(BUILTIN_PREFIX) :]
                if str(name).startswith(BUILTIN_PREFIX) and builtin not in BUILTIN_DATASETS:
                    errors.append(
                        f"data.{key}: unknown built-in dataset {name!r}; built-ins: "
                        f"{[BUILTIN_PREFIX + b for b in BUILTIN_DATASETS]}"
                    )
        try:
            self.synthetic.validate()
        except ConfigError as err:
            errors += err.errors
        _raise(errors)

    def dataset_config(self) -> DataConfig:
        """The loader's slice of this section (raises ValueError naming a bad data.* key)."""
        return DataConfig.from_section(self)


# --------------------------------------------------------------------------- actor


@dataclass
class TrainActorConfig(ActorConfig):
    """`ActorConfig` plus the trainer-level actor keys; validated with the other sections."""

    def __post_init__(self) -> None:
        # Coercions only: the Hydra schema needs a default instance (empty model_path).
        if isinstance(self.policy_loss, Mapping):
            self.policy_loss = PolicyLossConfig(**dict(self.policy_loss))
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    def to_actor_config(self) -> ActorConfig:
        """A plain, validated `ActorConfig` (without the trainer-level keys)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ActorConfig)}
        return ActorConfig(**values)

    def validate(self) -> None:
        """Every actor problem at once (`ActorConfig.validate` stops at the first)."""
        from fipo_trainer.algorithms.options import policy_loss_names
        from fipo_trainer.plugins import import_plugins

        errors: list[str] = []
        # An empty model path is reported as model.path (or filled later from model.tiny).
        overrides: dict[str, Any] = {"model_path": self.model_path or "<model.path>"}
        try:
            import_plugins(self.loss_plugins, "actor.loss_plugins")
        except (OSError, ImportError, ValueError) as err:
            errors.append(str(err))
            overrides["loss_plugins"] = []
        if self.loss_name not in policy_loss_names():
            errors.append(
                f"actor.loss_name={self.loss_name!r} is not a registered policy loss; use one of "
                f"{policy_loss_names()} (or algorithm=fipo|dapo|grpo; a loss of your own is "
                "registered by a file listed in actor.loss_plugins)"
            )
            overrides["loss_name"] = "vanilla"
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ActorConfig)}
        try:
            ActorConfig(**{**values, **overrides})  # validates on construction
        except ValueError as err:
            msg = str(err)
            if msg.startswith("policy_loss."):
                msg = "actor." + msg
            elif not msg.startswith("actor."):
                msg = f"actor: {msg}"
            errors.append(msg)
        if self.param_offload and self.zero_stage != 3:
            errors.append(
                "actor.param_offload needs actor.zero_stage=3 (ZeRO-2 keeps full parameters on "
                "every rank): set actor.zero_stage=3 or actor=zero3_offload"
            )
        _raise(errors)


# --------------------------------------------------------------------------- rollout


@dataclass
class TrainRolloutConfig(RolloutConfig):
    """`RolloutConfig` plus the driver's generation deadline (the engines never read it).

    ``generate_timeout_s=None`` derives each call's deadline from its size:
    ``max(generate_timeout_floor_s, generate_timeout_s_per_token x rows x max_tokens)``
    (``rollout.group.GenerationDeadline``), so a stalled worker is named within the floor
    on small runs and long generations of the paper recipes are not cut short.
    ``update_weights_bucket_megabytes`` (verl's key): the weight sync packs tensors into
    buckets of at most this size (a larger tensor alone); the sender and each engine hold
    one bucket at a time beside the model, so a smaller one trades sync speed for memory.
    """

    generate_timeout_s: float | None = None
    generate_timeout_floor_s: float = 120.0
    generate_timeout_s_per_token: float = 5e-4
    update_weights_bucket_megabytes: float = 256.0

    @property
    def update_weights_bucket_bytes(self) -> int:
        return max(1, int(self.update_weights_bucket_megabytes * 2**20))

    def validate(self) -> None:
        errors: list[str] = []
        if not self.update_weights_bucket_megabytes > 0:
            errors.append(
                "rollout.update_weights_bucket_megabytes must be > 0, got "
                f"{self.update_weights_bucket_megabytes}"
            )
        if self.generate_timeout_s is not None and not self.generate_timeout_s > 0:
            errors.append(
                "rollout.generate_timeout_s must be > 0 seconds or null (derived from the "
                f"batch size and rollout.max_tokens), got {self.generate_timeout_s}"
            )
        if not self.generate_timeout_floor_s > 0:
            errors.append(
                "rollout.generate_timeout_floor_s must be > 0 seconds, got "
                f"{self.generate_timeout_floor_s}"
            )
        if not self.generate_timeout_s_per_token >= 0:
            errors.append(
                "rollout.generate_timeout_s_per_token must be >= 0 seconds, got "
                f"{self.generate_timeout_s_per_token}"
            )
        try:
            super().validate()
        except ValueError as err:
            errors.append(str(err))
        _raise(errors)


# --------------------------------------------------------------------------- the whole


@dataclass
class TrainConfig:
    """Everything `fipo-train` reads (the schema of configs/config.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    actor: TrainActorConfig = field(default_factory=TrainActorConfig)
    rollout: TrainRolloutConfig = field(default_factory=TrainRolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


def register_configs() -> None:
    """Register `TrainConfig` as ``train_schema`` (idempotent; config.yaml lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
