"""TrainConfig: conversion from the composed Hydra tree, derived values, start-up validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.config import (
    SCHEMA_NAME,
    ConfigError,
    TrainActorConfig,
    TrainConfig,
    config_to_yaml,
    load_config,
    validate_config,
)

STRUCTURE = {"check_files": False, "check_platform": False}


def quick(*overrides: str) -> TrainConfig:
    """The quickstart recipe (default) with overrides, converted without building the model."""
    return load_config(compose_config(list(overrides)), build_model=False)


def errors_of(cfg: TrainConfig, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, **{**STRUCTURE, **kwargs})
    return str(info.value)


# --------------------------------------------------------------------------- schema / load


def test_schema_is_registered_in_hydra_config_store():
    from hydra.core.config_store import ConfigStore

    node = ConfigStore.instance().load(f"{SCHEMA_NAME}.yaml").node
    assert set(node.keys()) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert OmegaConf.get_type(node.actor) is TrainActorConfig


def test_default_train_config_builds_and_is_an_actor_config():
    cfg = TrainConfig()  # the schema default must construct (empty model path allowed here)
    assert isinstance(cfg.actor, ActorConfig)
    assert cfg.actor.ulysses_sequence_parallel_size == 1
    assert cfg.trainer.loggers == ["console", "jsonl", "tensorboard"]


def test_typo_in_a_key_fails_at_composition():
    with pytest.raises(ConfigError, match=r"unknown config key data\.trainer_batch_size; did you"):
        compose_config(["data.trainer_batch_size=3"])


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigError, match=r"cannot set data\.train_batch_size=many: .* Integer"):
        compose_config(["data.train_batch_size=many"])


def test_load_config_builds_typed_sections_and_derives_values():
    cfg = quick("data.max_response_length=20", "data.max_prompt_length=30")
    assert isinstance(cfg, TrainConfig)
    assert type(cfg.actor) is TrainActorConfig
    assert cfg.rollout.max_tokens == 20  # interpolated from data.max_response_length
    assert cfg.reward.max_response_length == 20
    assert cfg.rollout.max_model_len == 50  # derived: prompt + response
    assert cfg.actor.seed == cfg.rollout.seed == cfg.data.seed == cfg.trainer.seed
    assert cfg.trainer.run_dir == "outputs/fipo/quickstart_cpu"
    assert cfg.actor.betas == (0.9, 0.999)


def test_load_config_accepts_plain_dicts_and_rejects_unknown_keys():
    base = OmegaConf.to_container(compose_config([]), resolve=True)
    cfg = load_config(base, build_model=False)
    assert cfg.resources.actor_world_size == 1
    base["actor"]["lrr"] = 1.0
    with pytest.raises(ConfigError, match=r"actor\.lrr"):
        load_config(base, build_model=False)


def test_load_config_resolves_the_tiny_model():
    cfg = load_config(compose_config(["model.tiny.warm_start_steps=0"]))
    path = Path(cfg.model.path)
    assert (path / "config.json").is_file()
    assert cfg.actor.model_path == cfg.model.path
    validate_config(cfg, check_platform=False)  # data are built-in, the model exists
    # A saved config (model.path filled in) loads again: the run directory's config.yaml.
    assert load_config(OmegaConf.create(config_to_yaml(cfg))) == cfg


def test_plain_mappings_are_type_checked_and_derived_keys_filled():
    cfg = load_config({"data": {"max_response_length": 99}}, build_model=False)
    assert cfg.rollout.max_tokens == cfg.reward.max_response_length == 99
    with pytest.raises(ConfigError, match=r"data\.train_batch_size"):
        load_config({"data": {"train_batch_size": "many"}}, build_model=False)


def test_model_path_and_tiny_model_together_are_refused():
    with pytest.raises(ConfigError, match=r"model\.path=.*model\.tiny\.enable"):
        load_config(compose_config(["model.path=/some/dir"]))


def test_actor_model_path_is_derived_from_model_path(tmp_path):
    cfg = load_config(compose_config(["model=default", f"model.path={tmp_path}"]))
    assert cfg.actor.model_path == str(tmp_path)
    with pytest.raises(ConfigError, match=r"actor\.model_path=.*set model\.path only"):
        load_config(
            compose_config(["model=default", f"model.path={tmp_path}", "actor.model_path=/x"])
        )


def test_response_length_has_one_source_of_truth():
    with pytest.raises(ConfigError, match=r"rollout\.max_tokens=7 != data\.max_response_length"):
        quick("rollout.max_tokens=7")
    with pytest.raises(ConfigError, match=r"reward\.max_response_length=7"):
        quick("reward.max_response_length=7")


def test_clip_ratio_c_at_most_one_is_refused_naming_the_full_key():
    with pytest.raises(ConfigError, match=r"actor\.policy_loss\.clip_ratio_c .*must be > 1"):
        quick("actor.policy_loss.clip_ratio_c=1.0")
    cfg = quick()
    cfg.actor.policy_loss.clip_ratio_c = 0.5  # mutated after construction
    assert "actor.policy_loss.clip_ratio_c" in errors_of(cfg)


def test_reward_errors_name_the_reward_key():
    with pytest.raises(ConfigError, match=r"reward\.routes\['arithmetic'\]"):
        quick("reward.routes.arithmetic=nope")


def test_config_to_yaml_round_trips():
    cfg = quick()
    again = load_config(OmegaConf.create(config_to_yaml(cfg)), build_model=False)
    assert again == cfg


# --------------------------------------------------------------------------- validation


def test_quickstart_passes_structure_validation():
    assert validate_config(quick(), **STRUCTURE) == []


def test_train_batch_not_divisible_by_mini_batch():
    msg = errors_of(quick("data.train_batch_size=18", "data.gen_batch_size=18"))
    assert "data.train_batch_size=18 is not a multiple of actor.ppo_mini_batch_size=4" in msg


def test_responses_must_split_over_actor_ranks():
    msg = errors_of(quick("resources.actor_world_size=3", "resources.cpus_per_actor_worker=0.25"))
    assert "data.train_batch_size x rollout.n" in msg
    assert "resources.actor_world_size=3" in msg
    assert "actor.ppo_mini_batch_size x rollout.n" in msg


def test_gen_batch_smaller_than_train_batch_needs_dynamic_sampling():
    msg = errors_of(quick("algorithm=grpo", "data.gen_batch_size=8"))
    assert "data.gen_batch_size=8 < data.train_batch_size=16 without dynamic sampling" in msg
    # With dynamic sampling several rounds fill the batch: allowed.
    validate_config(quick("data.gen_batch_size=8"), **STRUCTURE)


def test_grpo_algorithm_warns_about_wasted_prompts_only():
    warnings = validate_config(quick("algorithm=grpo"), **STRUCTURE)
    (warning,) = [w for w in warnings if "data.gen_batch_size=24 > data.train_batch_size=16" in w]
    assert "set 'data.gen_batch_size=${data.train_batch_size}'" in warning  # the fix, for a shell


def test_n_below_two_with_grpo_advantages():
    msg = errors_of(quick("algorithm=grpo", "rollout.n=1", "data.gen_batch_size=16"))
    assert "rollout.n=1 with algorithm.adv_estimator=grpo" in msg


def test_n_below_two_with_dynamic_sampling():
    msg = errors_of(quick("rollout.n=1", "algorithm.adv_estimator=reinforce_plus_plus_baseline"))
    assert "rollout.n=1 with algorithm.filter_groups.enable=true" in msg


def test_unknown_loss_name():
    msg = errors_of(quick("actor.loss_name=ppo2"))
    assert "actor.loss_name='ppo2' is not a registered policy loss" in msg
    assert "'fipo'" in msg and "'vanilla'" in msg


def test_unknown_advantage_estimator():
    msg = errors_of(quick("algorithm.adv_estimator=gae"))
    assert "algorithm.adv_estimator='gae' is unknown" in msg


def test_dynamic_sampling_settings():
    msg = errors_of(
        quick(
            "algorithm.filter_groups.metric=reward",
            "algorithm.filter_groups.on_exhausted=retry",
            "algorithm.filter_groups.max_num_gen_batches=0",
        )
    )
    assert "algorithm.filter_groups.metric" in msg
    assert "algorithm.filter_groups.on_exhausted" in msg
    assert "algorithm.filter_groups.max_num_gen_batches" in msg


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope.parquet"
    cfg = quick(f"data.train_files=[{missing}]")
    msg = errors_of(cfg, check_files=True)
    assert f"data.train_files: file '{missing}' does not exist" in msg
    (tmp_path / "nope.parquet").write_bytes(b"")
    validate_config(cfg, check_files=True, check_platform=False)


def test_unknown_builtin_dataset_and_empty_train_files():
    assert "unknown built-in dataset 'builtin:chess'" in errors_of(
        quick("data.val_files=[builtin:chess]")
    )
    assert "data.train_files is empty" in errors_of(quick("data.train_files=[]"))
    # every run builds its validation set: empty, it failed after Ray and every role started
    assert "data.val_files is empty" in errors_of(
        quick("data.val_files=[]", "trainer.test_freq=0", "trainer.val_before_train=false")
    )


def test_a_tiny_model_size_its_builder_refuses_is_a_config_error():
    assert "model.tiny.hidden_size must be a multiple of 32" in errors_of(
        quick("model.tiny.hidden_size=48")
    )


def test_missing_model_directory_and_resume_path(tmp_path):
    cfg = quick("model=default", f"model.path={tmp_path / 'model'}", "trainer.resume=/no/ckpt")
    msg = errors_of(cfg, check_files=True)
    assert "model.path: directory" in msg
    assert "trainer.resume (a checkpoint): directory '/no/ckpt'" in msg
    (tmp_path / "not_a_checkpoint").mkdir()  # training refused it with a traceback
    msg = errors_of(quick(f"trainer.resume={tmp_path / 'not_a_checkpoint'}"), check_files=True)
    assert "is not a complete checkpoint (a global_step_N directory with trainer_state.pt)" in msg


def test_empty_model_path_without_tiny_model():
    msg = errors_of(quick("model=default"))
    assert "model.path is empty" in msg and "model=tiny" in msg


def test_prompt_plus_response_longer_than_max_model_len():
    msg = errors_of(quick("rollout.max_model_len=50"))  # 32 + 24 = 56
    assert "data.max_prompt_length + data.max_response_length = 56 exceeds" in msg
    assert "rollout.max_model_len=50" in msg


def test_token_budget_must_hold_one_sequence():
    msg = errors_of(quick("actor.ppo_max_token_len_per_gpu=40"))
    assert "actor.ppo_max_token_len_per_gpu=40" in msg and ">= 56" in msg


def test_sequence_parallel_2_on_2_ranks_is_accepted():
    sp = "actor.ulysses_sequence_parallel_size=2"
    validate_config(quick("resources.actor_world_size=2", sp), **STRUCTURE)


def test_sequence_parallel_must_divide_the_actor_world_size():
    cfg = quick("resources.actor_world_size=2", "actor.ulysses_sequence_parallel_size=4")
    msg = errors_of(cfg)
    assert "resources.actor_world_size=2 is not a multiple of" in msg
    assert "actor.ulysses_sequence_parallel_size=4" in msg


def test_sequence_parallel_must_split_the_heads(tmp_path):
    import json

    (tmp_path / "config.json").write_text(
        json.dumps(
            {"num_attention_heads": 6, "num_key_value_heads": 3, "max_position_embeddings": 512}
        )
    )
    sp = "actor.ulysses_sequence_parallel_size=2"
    cfg = quick("resources.actor_world_size=2", sp, f"model.path={tmp_path}")
    msg = errors_of(cfg, check_files=True)
    assert "num_attention_heads=6, num_key_value_heads=3" in msg
    assert "actor.ulysses_sequence_parallel_size=2" in msg and str(tmp_path) in msg


@pytest.fixture
def on_cpu(monkeypatch):
    """Platform checks as on a CPU machine (the CPU/CUDA decision is made in one place)."""

    from fipo_trainer import platform

    cpu = platform.Platform("cpu", "gloo", "float32", "sdpa", "cpu")
    monkeypatch.setattr(platform, "current_platform", lambda: cpu)
    return cpu


def test_offload_on_cpu_is_a_clear_warning(on_cpu):
    cfg = quick("actor=zero3_offload", "rollout=hf")
    warnings = validate_config(cfg, check_files=False, check_platform=True)
    assert any("actor.param_offload / actor.optimizer_offload" in w for w in warnings)


def test_param_offload_needs_zero3():
    msg = errors_of(quick("actor.param_offload=true", "actor.zero_stage=2"))
    assert "actor.param_offload needs actor.zero_stage=3" in msg


def test_component_validation_is_reported_with_keys():
    msg = errors_of(
        quick(
            "actor.zero_stage=1",
            "rollout.top_p=0",
            "trainer.nan_policy=ignore",
            "trainer.seed=-1",
        )
    )
    assert "actor.zero_stage must be 2 or 3" in msg
    assert "rollout.top_p must be in (0, 1]" in msg
    assert "trainer.nan_policy" in msg
    assert "trainer.seed must be >= 0, got -1" in msg  # numpy's generators take none


def test_unknown_logger():
    assert "trainer.loggers: unknown logger(s) ['mlflow']" in errors_of(
        quick("trainer.loggers=[console,mlflow]")
    )


def test_placement_rules():
    msg = errors_of(
        quick(
            "resources.placement=colocated",
            "resources.rollout_workers=3",
            "resources.cpus_per_rollout_worker=0.1",
        )
    )
    assert "resources.rollout_workers=3 must be <=" in msg
    assert "resources.placement must be" in errors_of(quick("resources.placement=shared"))
    validate_config(
        quick("resources.placement=colocated", "rollout.engines_per_worker=1"), **STRUCTURE
    )


def test_gpu_counts_must_fit_the_nodes():
    cfg = quick(
        "resources.gpus_per_node=4",
        "resources.actor_world_size=4",
        "resources.rollout_workers=1",
        "rollout.tensor_parallel_size=2",
        "rollout.engines_per_worker=1",
    )
    msg = errors_of(cfg)
    assert "split placement needs 6 GPUs" in msg and "= 4" in msg
    colocated = dataclasses.replace(
        cfg, resources=dataclasses.replace(cfg.resources, placement="colocated")
    )
    validate_config(colocated, **STRUCTURE)  # the engine shares the actor's 4 GPUs


def test_multi_node_needs_a_ray_cluster_address():
    msg = errors_of(quick("resources.nnodes=2"))
    assert "resources.nnodes=2 needs a running Ray cluster" in msg
    assert "resources.ray_address=auto" in msg
    msg = errors_of(quick("resources=cluster", "resources.ray_num_cpus=4"))
    assert "resources.ray_num_cpus only applies to a local Ray start" in msg


def test_platform_checks_on_a_cpu_machine(on_cpu):
    cfg = quick("resources.gpus_per_node=8", "resources.actor_world_size=4")
    msg = errors_of(cfg, check_platform=True)
    assert "resources.gpus_per_node=8 but this machine has no CUDA GPU" in msg
    msg = errors_of(
        quick("resources.ray_num_cpus=1", "resources.actor_world_size=2"), check_platform=True
    )
    assert "ask Ray for 1.5 CPUs" in msg


def test_all_errors_are_reported_at_once():
    cfg = quick("actor.loss_name=x", "algorithm.adv_estimator=y", "trainer.test_freq=-1")
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, **STRUCTURE)
    assert len(info.value.errors) == 3


def test_a_train_config_built_in_code_with_a_plain_actor_config_validates(tmp_path):
    cfg = quick()
    plain = ActorConfig(
        **{f.name: getattr(cfg.actor, f.name) for f in dataclasses.fields(ActorConfig)}
        | {"model_path": str(tmp_path)}
    )
    own = dataclasses.replace(cfg.model.tiny, enable=False)  # a model.path of its own
    cfg = dataclasses.replace(
        cfg, actor=plain, model=dataclasses.replace(cfg.model, path=str(tmp_path), tiny=own)
    )
    validate_config(cfg, **STRUCTURE)
    assert type(load_config(cfg, build_model=False).actor) is TrainActorConfig


def test_config_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError(["a.b: bad", "c.d: worse"])))
    assert err.errors == ["a.b: bad", "c.d: worse"] and "c.d: worse" in str(err)


def test_a_problem_two_checks_find_is_listed_once():
    from fipo_trainer.trainer.config import ConfigError

    err = ConfigError(["a must be >= 1", "b too", "a must be >= 1"])
    assert err.errors == ["a must be >= 1", "b too"]
    assert str(err).count("a must be >= 1") == 1
