"""`fipo-train`'s config: schema, loading with derived values, start-up validation.

Why a package: each responsibility is its own module, and callers import from here.

* `schema` / `sections` — the typed dataclasses (Hydra's ``train_schema``); each section's
  ``validate()`` checks its own fields.
* `load` — composed tree -> `TrainConfig` (`OmegaConf.to_object`), derived keys, YAML dump,
  and `prepare_config`, the start-up sequence (load, validate once, build the tiny model).
* `rules` — the cross-section rules and `validate_config`.
* `environment` — checks against files, the model directory and this machine.
"""

from __future__ import annotations

from fipo_trainer.trainer.config.environment import check_model_fits, model_positions
from fipo_trainer.trainer.config.errors import ConfigError
from fipo_trainer.trainer.config.load import (
    config_to_yaml,
    derive,
    load_config,
    prepare_config,
    resolve_model,
)
from fipo_trainer.trainer.config.rules import validate_config
from fipo_trainer.trainer.config.schema import (
    BUILTIN_DATASETS,
    BUILTIN_PREFIX,
    SCHEMA_NAME,
    TrainActorConfig,
    TrainConfig,
    TrainDataConfig,
    register_configs,
)
from fipo_trainer.trainer.config.sections import (
    FILTER_METRICS,
    KNOWN_LOGGERS,
    AlgorithmConfig,
    FilterGroupsConfig,
    ModelConfig,
    ResourcesConfig,
    SyntheticDataConfig,
    TinyModelConfig,
    TrainerConfig,
)

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_PREFIX",
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
    "check_model_fits",
    "config_to_yaml",
    "derive",
    "load_config",
    "model_positions",
    "prepare_config",
    "register_configs",
    "resolve_model",
    "validate_config",
]

register_configs()
