"""Composed Hydra tree -> typed `TrainConfig` with the derived values filled in.

Why apart from validation: conversion is OmegaConf's job (`OmegaConf.structured(TrainConfig)`
merged with the tree checks types and unknown keys, `OmegaConf.to_object` builds the
dataclasses), and derivation is a handful of "this key follows that one" assignments. Neither
judges whether the values make sense; `rules.validate_config` does, once, at start-up.
`prepare_config` is that start-up sequence in one call.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fipo_trainer.trainer.config.errors import ConfigError
from fipo_trainer.trainer.config.schema import TrainConfig, TrainDataConfig

logger = logging.getLogger(__name__)

#: Component messages that do not carry their section's name (raised while building).
_PREFIXES = {"policy_loss.": "actor.policy_loss."}


def _plain(cfg: DictConfig | Mapping[str, Any] | TrainConfig) -> dict[str, Any]:
    if isinstance(cfg, TrainConfig):
        values: Any = dataclasses.asdict(cfg)
    else:
        values = _resolved(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg)))
    assert isinstance(values, dict)
    values.pop("hydra", None)
    # A hand-written mapping may omit the derived keys: fill them like the YAML tree does.
    response = (values.get("data") or {}).get(
        "max_response_length", TrainDataConfig.max_response_length
    )
    values.setdefault("rollout", {}).setdefault("max_tokens", response)
    return values


def _resolved(cfg: DictConfig) -> Any:
    """The tree with every ``${...}`` resolved; an unresolvable or ``???`` value is a
    `ConfigError` naming its key (OmegaConf's own error is a traceback without the fix)."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError([f"{err.full_key} has no value (???): set {err.full_key}=..."]) from None
    except OmegaConfBaseException as err:
        why = str(err.msg or err).splitlines()[0]
        raise ConfigError([f"cannot resolve {err.full_key or 'the config'}: {why}"]) from None


def _to_object(values: dict[str, Any]) -> TrainConfig:
    from omegaconf.errors import OmegaConfBaseException

    try:  # types and unknown keys, reported with their full key by OmegaConf
        typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), values)
        obj = OmegaConf.to_object(typed)
    except OmegaConfBaseException as err:
        raise ConfigError([" ".join(str(err).split())]) from None
    except ValueError as err:  # a component that validates on construction
        if isinstance(err, ConfigError):
            raise
        msg = str(err)
        for short, full in _PREFIXES.items():
            if msg.startswith(short):
                msg = full + msg[len(short) :]
        raise ConfigError([msg]) from None
    assert isinstance(obj, TrainConfig)
    return obj


def load_config(
    cfg: DictConfig | Mapping[str, Any] | TrainConfig, *, build_model: bool = True
) -> TrainConfig:
    """Composed Hydra config (or a plain mapping, or a `TrainConfig`) -> derived `TrainConfig`.

    Derived: ``actor.model_path``/``tokenizer_path`` follow ``model``;
    ``actor.override_config`` and ``rollout.override_config`` follow
    ``model.override_config``; ``rollout.max_tokens`` and ``reward.max_response_length``
    follow ``data.max_response_length``; ``rollout.max_model_len`` defaults to prompt +
    response. With ``build_model`` the tiny model (``model.tiny.enable``) is built (cached)
    and becomes ``model.path``; ``build_model=False`` leaves ``model.path`` empty (dry runs,
    structure tests, and `prepare_config` before validation). Raises `ConfigError` for types,
    unknown keys and derived keys set by hand to something else; everything else is
    `validate_config`'s.
    """
    train = derive(_to_object(_plain(cfg)))
    return resolve_model(train) if build_model else train


def derive(cfg: TrainConfig) -> TrainConfig:
    """Fill the keys that follow others (in place; returns ``cfg``)."""
    errors: list[str] = []
    model, data, actor, rollout = cfg.model, cfg.data, cfg.actor, cfg.rollout
    # Paths as a shell reads them, once: "~" is the home directory wherever a path is used.
    cfg.trainer.run_dir = os.path.expanduser(cfg.trainer.run_dir)
    data.train_files = [os.path.expanduser(f) for f in data.train_files]
    data.val_files = [os.path.expanduser(f) for f in data.val_files]
    model.path = model.path and os.path.expanduser(model.path)
    model.tokenizer_path = model.tokenizer_path and os.path.expanduser(model.tokenizer_path)
    if actor.model_path and actor.model_path != model.path:
        errors.append(
            f"actor.model_path={actor.model_path!r} differs from model.path={model.path!r}: "
            "actor.model_path is derived, set model.path only"
        )
    actor.model_path = model.path
    if actor.tokenizer_path is None:
        actor.tokenizer_path = model.tokenizer_path
    overrides = dict(model.override_config)
    for key, section in (("actor", actor), ("rollout", rollout)):
        own = dict(section.override_config)
        if own and own != overrides:
            errors.append(
                f"{key}.override_config={own} differs from model.override_config={overrides}: "
                f"{key}.override_config is derived, set model.override_config only (the actor "
                "and the rollout engines must see the same model)"
            )
        section.override_config = dict(overrides)
    # Response length: one source of truth (the YAML tree interpolates it; check plain dicts).
    if rollout.max_tokens != data.max_response_length:
        errors.append(
            f"rollout.max_tokens={rollout.max_tokens} != data.max_response_length="
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
    if rollout.max_model_len is None:
        rollout.max_model_len = data.max_prompt_length + data.max_response_length
    if errors:
        raise ConfigError(errors)
    return cfg


def tiny_model_settings(cfg: TrainConfig) -> dict[str, Any]:
    """`build_tiny_model`'s arguments for this config: the build and `tiny_model_clash`
    (which needs the directory they name) read the same settings."""
    tiny, task = cfg.model.tiny, cfg.data.synthetic
    return {
        "hidden_size": tiny.hidden_size,
        "num_layers": tiny.num_layers,
        "warm_start_steps": tiny.warm_start_steps,
        "seed": tiny.seed,
        "task_digits": task.digits,
        "task_solution": task.solution_format,
    }


def tiny_model_clash(cfg: TrainConfig) -> str | None:
    """The one rule for ``model.path`` beside ``model.tiny.enable``: an error unless the path
    holds a tiny model built with these settings (a saved config, reloaded: its build marker
    says so). Validation (so the dry run) and `resolve_model` (before the build) both ask it."""
    model = cfg.model
    if not (model.tiny.enable and model.path):
        return None
    from fipo_trainer.data.tiny_model import TinyModelSettings, read_info

    info = read_info(Path(model.path).expanduser())  # the build's own record of its settings
    if info is not None and info.get("key") == TinyModelSettings(**tiny_model_settings(cfg)).key():
        return None
    return (
        f"model.path={model.path!r} and model.tiny.enable=true are both set: drop one "
        "(model=tiny builds the model and sets model.path; a model of your own wants "
        "model.tiny.enable=false)"
    )


def resolve_model(cfg: TrainConfig) -> TrainConfig:
    """Build the tiny model if asked (cached by its settings) and point the config at it."""
    model = cfg.model
    if not model.tiny.enable:
        return cfg
    if clash := tiny_model_clash(cfg):
        raise ConfigError([clash])
    from fipo_trainer.data.tiny_model import build_tiny_model

    # cheap when it exists (e.g. reloading a saved config)
    model.path = cfg.actor.model_path = str(build_tiny_model(**tiny_model_settings(cfg)))
    return cfg


def prepare_config(
    cfg: DictConfig | Mapping[str, Any] | TrainConfig,
    *,
    check_files: bool = True,
    check_platform: bool = True,
) -> TrainConfig:
    """The start-up sequence: convert, derive, validate once, then build the tiny model.

    Validation runs before the (possibly slow) tiny-model build and before anything heavy is
    imported; the built model's size is checked after it exists (`check_model_fits`). The
    result is what `run_training` takes: a validated config it need not check again.
    """
    from fipo_trainer.trainer.config.environment import check_model_fits
    from fipo_trainer.trainer.config.rules import validate_config

    train = load_config(cfg, build_model=False)
    # The data files' heads too (≈ 0.05 s for DAPO-Math-17k): a file training cannot read
    # fails here, not after Ray and every worker started.
    validate_config(
        train, check_files=check_files, check_platform=check_platform, check_data=check_files
    )
    if train.model.tiny.enable:
        resolve_model(train)
        check_model_fits(train)
    return train


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (for the run directory and ``--dry-run``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
