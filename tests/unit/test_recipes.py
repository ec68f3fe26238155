"""Recipes: every one composes, converts and validates; the 32B recipe equals FIPO_SPEC.md §2."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fipo_trainer.cli import compose_config, config_dir
from fipo_trainer.trainer.config import ConfigError, TrainConfig, load_config, validate_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
STRUCTURE = {"check_files": False, "check_platform": False}
FIPO_32B = "fipo_qwen2.5_32b_aime24"
DAPO_32B = "dapo_qwen2.5_32b_aime24"


def recipe(name: str, *overrides: str) -> TrainConfig:
    return load_config(compose_config([f"recipe={name}", *overrides]), build_model=False)


def test_the_expected_recipes_exist():
    assert set(RECIPES) >= {
        "quickstart_cpu",
        FIPO_32B,
        DAPO_32B,
        "fipo_qwen2.5_7b_math",
        "dapo_qwen2.5_7b_math",
    }


def test_recipes_directory_is_the_recipe_group():
    assert (config_dir() / "recipe").resolve() == (REPO / "recipes").resolve()


def test_default_recipe_is_the_cpu_quickstart():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir()), version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.runtime.choices.recipe == "quickstart_cpu"
    assert load_config(compose_config([]), build_model=False) == recipe("quickstart_cpu")


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_converts_and_validates_its_structure(name):
    cfg = recipe(name)
    assert cfg.trainer.experiment_name == name
    validate_config(cfg, **STRUCTURE)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_switches_algorithm_from_the_command_line(name):
    cfg = recipe(name, "algorithm=grpo", "data.gen_batch_size=${data.train_batch_size}")
    assert cfg.actor.loss_name == "vanilla"
    assert cfg.algorithm.filter_groups.enable is False
    assert cfg.actor.policy_loss.clip_ratio_high == 0.2
    validate_config(cfg, **STRUCTURE)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_switches_config_groups_from_the_command_line(name):
    """A group chosen on the command line wins over the recipe. ``rollout=hf`` was silently
    ignored: the quickstart and 32B recipes set ``rollout.engine: vllm`` in their body, which
    Hydra merges after the group."""
    assert recipe(name).rollout.engine == "vllm"
    assert recipe(name, "rollout=hf").rollout.engine == "hf"
    assert recipe(name, "actor=zero3").actor.zero_stage == 3


def test_quickstart_validates_fully_on_this_machine():
    validate_config(recipe("quickstart_cpu"))  # files (built-in), platform and all


def test_quickstart_shape():
    cfg = recipe("quickstart_cpu")
    assert cfg.model.tiny.enable and cfg.model.tiny.warm_start_steps > 0
    assert cfg.data.train_files == ["builtin:arithmetic"]
    # 1 rank, 2 engines forked in 1 worker: the fastest on-policy layout on 2 cores
    assert cfg.resources.actor_world_size == 1 and cfg.resources.rollout_workers == 1
    assert cfg.rollout.engines_per_worker == 2 and cfg.resources.placement == "split"
    assert cfg.trainer.async_mode == "off"
    assert cfg.resources.gpus_per_node == 0
    assert cfg.rollout.engine == "vllm"
    assert cfg.reward.grader_for("arithmetic") == "dapo"
    assert cfg.actor.loss_name == "fipo"
    assert cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size >= 2  # FIPO weights != 1
    assert cfg.algorithm.filter_groups.enable
    assert 0 < cfg.trainer.test_freq < cfg.trainer.total_training_steps


def _flat(value: object, prefix: str = "") -> dict[str, object]:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, object] = {}
    for key, item in value.items():
        out |= _flat(item, f"{prefix}.{key}" if prefix else str(key))
    return out


def test_async_quickstart_is_the_quickstart_overlapped():
    """Same model, task, data, layout, steps and loss; only the async knobs differ."""
    sync, overlapped = _flat(recipe("quickstart_cpu")), _flat(recipe("quickstart_cpu_async"))
    changed = {key: overlapped[key] for key in sync if sync[key] != overlapped[key]}
    assert changed == {
        "trainer.experiment_name": "quickstart_cpu_async",
        "trainer.run_dir": "outputs/fipo/quickstart_cpu_async",
        "trainer.async_mode": "one_step",
        "algorithm.rollout_correction.enable": True,
    }
    validate_config(recipe("quickstart_cpu_async"))  # split placement: async is allowed


def test_gpu_quickstart_is_the_quickstart_on_one_gpu():
    """Same model, task, algorithm and steps; only where it runs differs (1 GPU,
    colocated, one engine that sleeps during the update)."""
    cpu, gpu = _flat(recipe("quickstart_cpu")), _flat(recipe("quickstart_gpu"))
    changed = {key: gpu[key] for key in cpu if cpu[key] != gpu[key]}
    assert changed == {
        "trainer.experiment_name": "quickstart_gpu",
        "trainer.run_dir": "outputs/fipo/quickstart_gpu",
        "resources.gpus_per_node": 1,
        "resources.placement": "colocated",
        "resources.cpus_per_actor_worker": 1.0,
        "resources.cpus_per_rollout_worker": 1.0,
        "rollout.engines_per_worker": 1,
        "rollout.free_cache_engine": True,
        "rollout.gpu_memory_utilization": 0.3,
    }
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_node=1 but this machine has no"):
        validate_config(recipe("quickstart_gpu"))  # this CPU machine: the rule names the fix


@pytest.mark.parametrize("name", [FIPO_32B, DAPO_32B])
def test_32b_recipes_with_sequence_parallel_8_are_accepted(name):
    cfg = recipe(name)
    assert cfg.actor.ulysses_sequence_parallel_size == 8
    validate_config(cfg, **STRUCTURE)


@pytest.mark.parametrize("name", ["fipo_qwen2.5_7b_math", "dapo_qwen2.5_7b_math"])
def test_7b_recipes_need_nothing_unimplemented(name):
    validate_config(recipe(name), **STRUCTURE)


def test_gpu_recipes_report_missing_files_and_gpus():
    cfg = recipe(FIPO_32B, "data.data_dir=/nonexistent")
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, check_files=True, check_platform=False)
    text = str(info.value)
    assert "/nonexistent/dapo-math-17k.parquet" in text
    assert "/nonexistent/aime-2024.parquet" in text
    assert "model.path" in text


def test_data_dir_points_the_recipes_at_the_shared_data():
    data = REPO.parent / "shared" / "data"
    cfg = recipe(FIPO_32B, f"data.data_dir={data}")
    assert cfg.data.train_files == [str(data / "dapo-math-17k.parquet")]
    assert cfg.data.val_files == [str(data / "aime-2024.parquet")]


# --------------------------------------------------------------------------- FIPO_SPEC.md §2


@pytest.fixture(scope="module")
def fipo32() -> TrainConfig:
    return recipe(FIPO_32B)


def test_spec_model(fipo32):
    assert Path(fipo32.model.path).name == "Qwen2.5-32B" and not fipo32.model.tiny.enable


def test_spec_train_and_val_data(fipo32):
    assert [Path(f).name for f in fipo32.data.train_files] == ["dapo-math-17k.parquet"]
    assert [Path(f).name for f in fipo32.data.val_files] == ["aime-2024.parquet"]


def test_spec_prompt(fipo32):
    d = fipo32.data  # the DAPO instruction is part of the dataset's prompt column
    assert (d.prompt_key, d.apply_chat_template, d.truncation) == ("prompt", True, "left")


def test_spec_max_prompt_and_response_tokens(fipo32):
    assert (fipo32.data.max_prompt_length, fipo32.data.max_response_length) == (2048, 20480)
    assert fipo32.rollout.max_tokens == 20480 and fipo32.rollout.max_model_len == 22528


def test_spec_overlong_buffer(fipo32):
    r = fipo32.reward
    assert (r.overlong_buffer_enable, r.overlong_buffer_len, r.overlong_penalty_factor) == (
        True,
        4096,
        1.0,
    )
    assert r.max_response_length == 20480


def test_spec_train_and_gen_batch_size(fipo32):
    assert (fipo32.data.train_batch_size, fipo32.data.gen_batch_size) == (512, 2048)


def test_spec_rollout_n(fipo32):
    assert fipo32.rollout.n == 16


def test_spec_ppo_mini_batch_size(fipo32):
    assert fipo32.actor.ppo_mini_batch_size == 64
    assert fipo32.data.train_batch_size // fipo32.actor.ppo_mini_batch_size == 8
    assert fipo32.actor.ppo_epochs == 1


def test_spec_micro_batching(fipo32):
    assert fipo32.actor.use_dynamic_bsz and fipo32.actor.ppo_max_token_len_per_gpu == 22528


def test_spec_optimizer(fipo32):
    a = fipo32.actor
    assert (a.lr, a.lr_warmup_steps, a.weight_decay, a.grad_clip) == (1e-6, 10, 0.1, 1.0)


def test_spec_dynamic_sampling(fipo32):
    fg = fipo32.algorithm.filter_groups
    assert (fg.enable, fg.metric, fg.max_num_gen_batches) == (True, "acc", 10)


def test_spec_clip(fipo32):
    pl = fipo32.actor.policy_loss
    assert (pl.clip_ratio_low, pl.clip_ratio_high, pl.clip_ratio_c) == (0.2, 0.28, 10.0)


def test_spec_fipo(fipo32):
    pl = fipo32.actor.policy_loss
    assert fipo32.actor.loss_name == "fipo"
    assert (
        pl.decay_rate,
        pl.future_kl_clip_ratio,
        pl.future_kl_clip_high_only,
        pl.safety_thresh,
    ) == (32.0, 0.2, True, 10.0)
    assert pl.loss_agg_mode == "token-mean"


def test_spec_kl_and_entropy(fipo32):
    # No KL / entropy loss terms exist in the trainer (entropy is always logged, no switch).
    names = {f.name for f in dataclasses.fields(type(fipo32.actor))}
    assert not any("kl" in name or "entropy" in name for name in names)


def test_spec_advantage(fipo32):
    assert fipo32.algorithm.adv_estimator == "grpo" and fipo32.algorithm.norm_adv_by_std_in_grpo


def test_spec_sampling(fipo32):
    r = fipo32.rollout
    assert (r.temperature, r.top_p) == (1.0, 1.0)
    assert (r.val.temperature, r.val.top_p, r.val.n) == (1.0, 0.7, 32)
    assert r.val_sampling().max_tokens == 20480


def test_spec_hardware(fipo32):
    res, r = fipo32.resources, fipo32.rollout
    assert (res.nnodes, res.gpus_per_node) == (16, 8)
    assert fipo32.actor.ulysses_sequence_parallel_size == 8
    assert (r.engine, r.tensor_parallel_size, r.gpu_memory_utilization) == ("vllm", 4, 0.8)
    # The paper's colocated hybrid engine: every GPU holds one actor rank and one TP rank.
    assert res.placement == "colocated" and r.free_cache_engine
    assert res.actor_world_size == 128 == res.rollout_workers * r.tensor_parallel_size
    assert res.ray_address == "auto"


@pytest.mark.parametrize("name", ["fipo_qwen2.5_7b_math", "dapo_qwen2.5_7b_math"])
def test_7b_layout_is_colocated_on_its_32_gpus(name):
    cfg = recipe(name)
    res, r = cfg.resources, cfg.rollout
    assert (res.placement, res.nnodes * res.gpus_per_node) == ("colocated", 32)
    assert res.actor_world_size == 32 == res.rollout_workers * r.tensor_parallel_size
    assert r.free_cache_engine and not cfg.actor.param_offload


def test_spec_memory(fipo32):
    a = fipo32.actor
    assert (a.param_offload, a.optimizer_offload, a.gradient_checkpointing) == (True, True, True)
    assert a.zero_stage == 3


def test_spec_schedule(fipo32):
    t = fipo32.trainer
    assert (t.val_before_train, t.test_freq, t.save_freq, t.resume) == (True, 5, 5, "auto")
    assert 500 <= t.total_training_steps <= 600


def test_dapo_32b_differs_only_where_the_spec_says(fipo32):
    dapo = recipe(DAPO_32B)
    assert (dapo.data.gen_batch_size, dapo.actor.ppo_mini_batch_size) == (1536, 32)
    assert dapo.actor.loss_name == "vanilla" and dapo.algorithm.name == "dapo"
    same = dataclasses.replace(
        dapo,
        data=dataclasses.replace(dapo.data, gen_batch_size=2048),
        actor=dataclasses.replace(dapo.actor, ppo_mini_batch_size=64, loss_name="fipo"),
        algorithm=dataclasses.replace(dapo.algorithm, name="fipo"),
        trainer=dataclasses.replace(
            dapo.trainer, experiment_name=FIPO_32B, run_dir=fipo32.trainer.run_dir
        ),
    )
    assert same == fipo32


def test_fipo_7b_spec_values():
    cfg = recipe("fipo_qwen2.5_7b_math")
    pl = cfg.actor.policy_loss
    assert cfg.actor.loss_name == "fipo"
    assert cfg.rollout.n == 32
    assert cfg.data.max_response_length == 10240
    assert cfg.reward.overlong_buffer_len == 2048
    assert cfg.actor.ppo_mini_batch_size == 64
    assert (pl.decay_rate, pl.future_kl_clip_ratio, pl.future_kl_clip_high_only) == (
        32.0,
        0.2,
        False,
    )
    assert pl.safety_thresh == 3.0
    assert "7B" in Path(cfg.model.path).name


def test_dapo_7b_spec_values():
    cfg = recipe("dapo_qwen2.5_7b_math")
    assert cfg.actor.loss_name == "vanilla"
    assert cfg.rollout.n == 16
    assert cfg.data.max_response_length == 8192
    assert cfg.reward.overlong_buffer_len == 4096
    assert cfg.actor.ppo_mini_batch_size == 32


PAPER_RECIPES = [FIPO_32B, DAPO_32B, "fipo_qwen2.5_7b_math", "dapo_qwen2.5_7b_math"]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_pin_the_reference_update_and_reward(name):
    cfg = recipe(name)
    assert cfg.actor.loss_scale == "reference"  # verl 0.5's per-micro-batch normaliser
    assert cfg.actor.lr_warmup_unit == "train_step"  # warm-up counted in training steps
    assert cfg.reward.dapo_boxed_fallback is False  # the published DAPO rule


def test_quickstart_keeps_the_defaults():
    cfg, defaults = recipe("quickstart_cpu"), TrainConfig()
    assert cfg.actor.loss_scale == defaults.actor.loss_scale == "global"
    assert cfg.actor.lr_warmup_unit == defaults.actor.lr_warmup_unit == "optimizer_step"
    assert cfg.reward.dapo_boxed_fallback is False
    assert cfg.model.override_config == {}
