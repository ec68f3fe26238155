"""Command-line overrides as a verl user writes them, rewritten before Hydra reads them.

Why: Hydra reads overrides against the typed schema, which turns two everyday forms into
errors. A typed mapping refuses new entries unless the override starts with ``++`` ("not in
struct"), and a list-valued key refuses one bare value ("str is not a ListConfig"), where
verl's ``data.train_files=/data/train.parquet`` works. Both are opened here, keyed by the
schema's own field types, and a path value starting with ``~`` (which Hydra cannot parse) is
quoted; every other override passes unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Sequence

_BACKSLASHES_BEFORE_QUOTE_OR_END = re.compile(r"(\\*)('|$)")


def quoted(value: object) -> str:
    """``'value'``, which Hydra reads back as exactly ``str(value)`` (a path may hold ``=``,
    spaces, commas, brackets or quotes, each of which its grammar would parse)."""
    text = _BACKSLASHES_BEFORE_QUOTE_OR_END.sub(
        lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), str(value)
    )
    return f"'{text}'"


@functools.cache
def _container_keys() -> dict[type, tuple[str, ...]]:
    """The schema's dotted keys by container type (``dict``, ``list``): one walk of the
    schema per process, however often the command line is read."""
    from fipo_trainer.trainer.config.schema import TrainConfig

    found: dict[type, list[str]] = {dict: [], list: []}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if typing.get_origin(hint) in found:
                found[typing.get_origin(hint)].append(prefix + f.name)
            elif dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")

    walk(TrainConfig, "")
    return {kind: tuple(keys) for kind, keys in found.items()}


def map_keys() -> list[str]:
    """The schema's mapping-valued keys (``model.override_config``,
    ``resources.actor_bundle_resources``): their entries are the user's to name."""
    return list(_container_keys()[dict])


def list_keys() -> list[str]:
    """The schema's list-valued keys (``data.train_files``, ``trainer.loggers``)."""
    return list(_container_keys()[list])


def override_key(override: str) -> str | None:
    """The key a plain ``a.b=value`` override sets (None for ``+``/``~`` and flags)."""
    if override.startswith(("+", "~", "-")) or "=" not in override:
        return None
    return override.split("=", 1)[0]


def _as_list(value: str) -> str | None:
    """One bare value as a one-element list; None for what Hydra reads as more than one value
    or as no string (a list, a sweep, an interpolation, null): Hydra keeps those."""
    if not value or value[0] in "[$" or value == "null":
        return None
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
        return f"[{value}]"  # quoted already
    if "," in value or value[0] in "({":
        return None
    return f"[{quoted(value)}]"


def _as_list_sweep(value: str) -> str | None:
    """``a,b`` as ``['a'],['b']``: Hydra's sweep then gives each job a one-element list (a
    bare ``a`` fails its merge). None for anything else (``[a,b]``, ``choice(...)``, ``${}``)."""
    items = value.split(",")
    if len(items) < 2 or not all(i and not any(c in i for c in "$[](){}") for i in items):
        return None
    if any((i[0] in "'\"" or i[-1] in "'\"") and not (len(i) > 1 and i[0] == i[-1])
           for i in items):
        return None  # a quote that spans a comma: Hydra's to read
    return ",".join(listed for i in items if (listed := _as_list(i)) is not None)


def open_overrides(overrides: Sequence[str]) -> list[str]:
    """``resources.actor_bundle_resources={a: 1}`` or ``model.override_config.k=v`` as
    ``++...``; ``data.train_files=/d/train.parquet`` as
    ``data.train_files=['/d/train.parquet']`` (with ``-m``, ``=a,b`` as ``=['a'],['b']``);
    ``trainer.run_dir=~/runs/a`` quoted (Hydra's grammar reads no value that starts with
    ``~``; the config expands it)."""
    maps, lists = map_keys(), set(list_keys())
    sweep = any(o in ("-m", "--multirun") for o in overrides)
    out = []
    for o in overrides:
        key = override_key(o)
        value = o.split("=", 1)[1] if key else ""
        if key and any(key == m or key.startswith(m + ".") for m in maps):
            o = "++" + o
        elif key in lists and (listed := _as_list(value)) is not None:
            o = f"{key}={listed}"
        elif key in lists and sweep and (swept := _as_list_sweep(value)) is not None:
            o = f"{key}={swept}"
        elif value.startswith("~"):
            o = f"{key}={quoted(value)}"
        out.append(o)
    return out


_MISSING_OPTION = re.compile(r"Could not (?:find|load) '([^']+)/([^'/]+)'")
_OPTIONS = re.compile(r"Available options in '[^']*':\n((?:\t.*\n?)*)")
_AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^'=]+)=([^']*)'")


def composition_message(hydra_message: str) -> str:
    """Hydra's composition error as one line with its fix: a config group's unknown option
    lists the group's options; ``key=a,b`` asks for a list (Hydra's own text is a trace)."""
    lines = hydra_message.splitlines()
    if match := _MISSING_OPTION.search(hydra_message):
        group, option = match.groups()
        opts = _OPTIONS.search(hydra_message)
        listed = f"; available: {', '.join(opts.group(1).split())}" if opts else ""
        return f"no option {option!r} in config group {group!r}{listed}"
    if match := _AMBIGUOUS.search(hydra_message):
        key, value = match.groups()
        return (f"ambiguous value {key}={value}: write a list, {key}=[{value}], quote a "
                f"string, {key}='{value}', or sweep it with --multirun")
    return lines[0] if lines else "config composition failed"


# verl's key prefixes and their places here, longest first: a verl user's override that names
# an unknown key is answered with this config's key (``unknown_key_message``).
VERL_PREFIXES = (
    ("actor_rollout_ref.actor.optim.", "actor."),
    ("actor_rollout_ref.actor.fsdp_config.", "actor."),
    ("actor_rollout_ref.actor.", "actor."),
    ("actor_rollout_ref.rollout.val_kwargs.", "rollout.val."),
    ("actor_rollout_ref.rollout.", "rollout."),
    ("actor_rollout_ref.model.", "model."),
    ("reward_model.", "reward."),
    ("trainer.n_gpus_per_node", "resources.gpus_per_node"),
    ("trainer.nnodes", "resources.nnodes"),
    ("trainer.logger", "trainer.loggers"),
)


# verl's keys whose place the prefix table gets wrong (checked first), and verl's keys with a
# note: what the official FIPO launcher's value means here, or that there is no such term.
VERL_KEYS = {
    "actor_rollout_ref.actor.loss_agg_mode": "actor.policy_loss.loss_agg_mode",
    "actor_rollout_ref.actor.policy_loss.loss_mode": "actor.loss_name",
    "data.filter_overlong_prompts": "data.truncation",
    "ray_kwargs.timeline_json_file": "trainer.timeline_json_file",
    "ray_init.timeline_json_file": "trainer.timeline_json_file",  # verl before 0.5
}
_NO_KL = (
    "this trainer has no KL-to-reference loss or entropy bonus (the FIPO/DAPO recipes use "
    "neither): drop the override"
)
VERL_NOTES = {
    "actor_rollout_ref.actor.policy_loss.loss_mode": "verl's future_kl is actor.loss_name=fipo",
    "data.filter_overlong_prompts": (
        "verl's filter_overlong_prompts=true is data.truncation=filter, which drops prompts "
        "longer than data.max_prompt_length; false keeps them: data.truncation=left|right|error"
    ),
    **dict.fromkeys(
        ("actor_rollout_ref.actor." + k for k in (
            "use_kl_loss", "kl_loss_coef", "kl_loss_type", "entropy_coeff")),
        _NO_KL,
    ),
}


def verl_message(key: str, keys: Sequence[str]) -> str | None:
    """The answer to verl's ``key`` (an unknown key here): this config's key, or why there is
    none; None when ``key`` is not verl's or its place here is no key (difflib's turn)."""
    ours, note = from_verl(key), VERL_NOTES.get(key)
    if ours in keys:
        return f"unknown config key {key} (verl's name); here it is {ours}" + (
            f" ({note})" if note else "")
    return f"unknown config key {key} (verl's name): {note}" if note else None


def from_verl(key: str) -> str | None:
    """The key verl's ``key`` would be here (``actor_rollout_ref.actor.optim.lr`` ->
    ``actor.lr``): `VERL_KEYS`, then `VERL_PREFIXES`; None when ``key`` is not verl's."""
    if key in VERL_KEYS:
        return VERL_KEYS[key]
    for verl, ours in VERL_PREFIXES:
        if key == verl or (verl.endswith(".") and key.startswith(verl)):
            return ours + key[len(verl) :]
    return None
