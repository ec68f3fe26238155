"""Start-up config: model.override_config (context extension), the positions check, the
structure (to_object, one validation, each section checks itself) and resources keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer import config as config_pkg
from fipo_trainer.trainer.config import (
    ConfigError,
    ResourcesConfig,
    TrainConfig,
    load_config,
    prepare_config,
    validate_config,
)

STRUCTURE = {"check_files": False, "check_platform": False}
SEVEN_B = ["fipo_qwen2.5_7b_math", "dapo_qwen2.5_7b_math"]
NO_EXTENSION = "~model.override_config.max_position_embeddings"


def compose(*overrides: str) -> TrainConfig:
    return load_config(compose_config(list(overrides)), build_model=False)


@pytest.fixture(scope="module")
def model_4096(tmp_path_factory) -> Path:
    """A tiny Qwen2 whose config.json states 4096 positions (as Qwen2.5-Math-7B does)."""
    from fipo_trainer.data.tiny_model import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "qwen_4096", max_position_embeddings=4096
    )


@pytest.fixture
def data_dir(tmp_path) -> Path:
    for name in ("dapo-math-17k.parquet", "aime-2024.parquet"):
        (tmp_path / name).write_bytes(b"")  # only their existence is checked here
    return tmp_path


# --------------------------------------------------------------------------- A.5 context


@pytest.mark.parametrize("name", SEVEN_B)
def test_7b_recipes_carry_the_32768_extension_to_actor_and_rollout(name):
    cfg = compose(f"recipe={name}")
    ext = {"max_position_embeddings": 32768}
    assert cfg.model.override_config == cfg.actor.override_config == ext
    assert cfg.rollout.override_config == ext


@pytest.mark.parametrize("name", SEVEN_B)
def test_7b_recipe_on_a_4096_position_model_without_the_extension_is_refused(
    name, model_4096, data_dir
):
    cfg = compose(
        f"recipe={name}", f"model.path={model_4096}", f"data.data_dir={data_dir}", NO_EXTENSION
    )
    assert cfg.actor.override_config == cfg.rollout.override_config == {}
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, check_files=True, check_platform=False)
    (msg,) = info.value.errors  # the only problem
    total = cfg.data.max_prompt_length + cfg.data.max_response_length
    assert f"data.max_prompt_length + data.max_response_length = {total}" in msg
    assert "max_position_embeddings=4096" in msg
    assert "model.override_config.max_position_embeddings=" in msg


@pytest.mark.parametrize("name", SEVEN_B)
def test_7b_recipe_with_the_extension_is_accepted(name, model_4096, data_dir):
    cfg = compose(f"recipe={name}", f"model.path={model_4096}", f"data.data_dir={data_dir}")
    assert validate_config(cfg, check_files=True, check_platform=False) is not None


def test_max_model_len_beyond_the_positions_is_refused(model_4096, data_dir):
    cfg = compose(
        "recipe=fipo_qwen2.5_7b_math",
        f"model.path={model_4096}",
        f"data.data_dir={data_dir}",
        NO_EXTENSION,
        "data.max_response_length=2048",
        "rollout.max_model_len=8192",
    )
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, check_files=True, check_platform=False)
    msg = str(info.value)
    assert "rollout.max_model_len=8192 exceeds the model's max_position_embeddings=4096" in msg


def test_override_config_is_set_once_in_model():
    cfg = compose("+model.override_config.max_position_embeddings=2048")
    assert (
        cfg.actor.override_config
        == cfg.rollout.override_config
        == {"max_position_embeddings": 2048}
    )
    with pytest.raises(ConfigError, match=r"actor\.override_config=.*set model\.override_config"):
        compose("+actor.override_config.max_position_embeddings=99")
    with pytest.raises(ConfigError, match=r"rollout\.override_config=.*set model\.override_config"):
        compose("+rollout.override_config.rope_theta=1.0")
    with pytest.raises(ConfigError, match=r"model\.override_config\.max_position_embeddings"):
        validate_config(compose("+model.override_config.max_position_embeddings=-1"), **STRUCTURE)


def test_prepare_config_checks_the_built_tiny_model(monkeypatch):
    # prepare_config validates before the build, then checks the built model's positions.
    cfg = prepare_config(compose_config(["model.tiny.warm_start_steps=0"]), check_platform=False)
    assert Path(cfg.model.path, "config.json").is_file() and cfg.actor.model_path == cfg.model.path
    with pytest.raises(ConfigError, match="max_position_embeddings=1024"):
        prepare_config(
            compose_config(
                [
                    "model.tiny.warm_start_steps=0",
                    "data.max_response_length=1100",
                    "actor.ppo_max_token_len_per_gpu=2048",
                ]
            ),
            check_platform=False,
        )


# --------------------------------------------------------------------------- B structure


def test_validation_runs_once_in_prepare_config(monkeypatch):
    from fipo_trainer.trainer.config import load, rules

    calls = []
    real = rules.validate_config
    monkeypatch.setattr(rules, "validate_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepare_config(compose_config(["model.tiny.warm_start_steps=0"]), check_platform=False)
    assert calls == [1]
    assert not hasattr(load, "_build") and not hasattr(load, "_dataclass_in")


def test_load_uses_omegaconf_to_object(monkeypatch):
    from omegaconf import OmegaConf

    seen = []
    real = OmegaConf.to_object
    monkeypatch.setattr(OmegaConf, "to_object", lambda c: seen.append(1) or real(c))
    assert type(compose()) is TrainConfig and seen


def test_every_config_module_is_small_and_says_why():
    for path in Path(config_pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, path
        assert text.startswith('"""'), path


def test_each_section_validates_its_own_fields():
    cfg = compose()
    cfg.trainer.nan_policy = "ignore"
    with pytest.raises(ConfigError, match=r"trainer\.nan_policy"):
        cfg.trainer.validate()
    res = ResourcesConfig(nnodes=0, placement="shared", gpus_per_node=-1)
    with pytest.raises(ConfigError) as info:
        res.validate()
    assert len(info.value.errors) == 3
    with pytest.raises(ConfigError, match=r"data\.truncation"):
        dataclasses.replace(cfg.data, truncation="middle").validate()


def test_the_data_section_is_the_loaders_config():
    from fipo_trainer.data.config import DataConfig

    data = compose("data.max_prompt_length=40", "data.schema=raw").data
    loader = data.dataset_config()
    assert type(loader) is DataConfig
    assert (loader.max_prompt_length, loader.schema, loader.truncation) == (40, "raw", "left")


# --------------------------------------------------------------------------- A.6 resources


def test_cpu_check_counts_what_placement_reserves(monkeypatch):

    from fipo_trainer import platform

    cpu = platform.Platform("cpu", "gloo", "float32", "sdpa", "cpu")
    monkeypatch.setattr(platform, "current_platform", lambda: cpu)
    two_ranks = ("resources.actor_world_size=2", "rollout.engines_per_worker=1")
    split = compose(
        "resources.ray_num_cpus=2", "resources.cpus_per_rollout_worker=1.0", *two_ranks
    )
    validate_config(split, check_files=False)  # 2 x 0.5 + 1 x 1.0 = 2
    colocated = compose(
        "resources.ray_num_cpus=2",
        "resources.cpus_per_rollout_worker=1.0",
        "resources.placement=colocated",
        *two_ranks,
    )
    with pytest.raises(ConfigError) as info:
        validate_config(colocated, check_files=False)
    msg = str(info.value)
    assert "ask Ray for 3 CPUs" in msg  # every colocated slot holds a rollout share


def test_forked_engines_are_refused_on_cuda_and_when_colocated(monkeypatch):

    from fipo_trainer import platform

    cpu = platform.Platform("cpu", "gloo", "float32", "sdpa", "cpu")
    monkeypatch.setattr(platform, "current_platform", lambda: cpu)
    split = compose("recipe=quickstart_cpu_async", "rollout.engines_per_worker=2")
    validate_config(split, check_files=False)
    colocated = compose("rollout.engines_per_worker=2", "resources.placement=colocated")
    with pytest.raises(ConfigError, match=r"rollout\.engines_per_worker=2 forks engines"):
        validate_config(colocated, check_files=False)
    cuda = platform.Platform("cuda", "nccl", "bfloat16", "sdpa", "cuda")
    monkeypatch.setattr(platform, "current_platform", lambda: cuda)
    on_gpus = compose(
        "recipe=quickstart_cpu_async", "rollout.engines_per_worker=2", "resources.gpus_per_node=1"
    )
    with pytest.raises(ConfigError, match="CUDA does not survive a fork"):
        validate_config(on_gpus, check_files=False)


def test_a_cpu_run_on_a_cuda_machine_names_the_gpu_quickstart(monkeypatch):
    """The default (CPU) quickstart on a GPU box: one error naming the three ways out, not
    the fork rule's (the fix is not one engine) nor a crash in a worker without a device."""
    from fipo_trainer import platform

    cuda = platform.Platform("cuda", "nccl", "bfloat16", "sdpa", "cuda")
    monkeypatch.setattr(platform, "current_platform", lambda: cuda)
    with pytest.raises(ConfigError) as info:
        validate_config(compose(), check_files=False)
    msg = str(info.value)
    assert "resources.gpus_per_node=0 asks for a CPU run" in msg
    assert "recipe=quickstart_gpu" in msg and "FIPO_FORCE_CPU=1" in msg
    assert "fork" not in msg
    gpu = compose("recipe=quickstart_gpu")
    assert gpu.resources.gpus_per_node == 1
    validate_config(gpu, check_files=False)  # what the error names passes this machine's rules
