"""Start-up rules for vLLM tensor parallel k: engines x k devices, colocated or split, and the
model's heads split over k ranks (vLLM's rule, KV heads replicated when fewer than k)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.config import ConfigError, TrainConfig, load_config, validate_config
from fipo_trainer.trainer.config.environment import tp_splits_heads

STRUCTURE = {"check_files": False, "check_platform": False}
GPU = ["resources.gpus_per_node=8", "rollout.free_cache_engine=true"]


def quick(*overrides: str) -> TrainConfig:
    return load_config(compose_config(list(overrides)), build_model=False)


def colocated(world: int, engines: int, tp: int, *more: str) -> TrainConfig:
    return quick(
        "resources.placement=colocated",
        f"resources.actor_world_size={world}",
        f"resources.rollout_workers={engines}",
        f"rollout.tensor_parallel_size={tp}",
        "rollout.engines_per_worker=1",  # an engine of TP > 1 is never forked
        "data.train_batch_size=16",
        "actor.ppo_mini_batch_size=4",
        *more,
    )


def own(path) -> list[str]:
    """A model directory of the test's own (the default recipe builds the tiny model)."""
    return [f"model.path={path}", "model.tiny.enable=false"]


def errors_of(cfg: TrainConfig, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, **{**STRUCTURE, **kwargs})
    return info.value.errors


def test_colocated_tensor_parallel_is_accepted():
    # The paper's layout in small: 8 GPUs, 2 engines of TP 4 on the actor's devices.
    warnings = validate_config(colocated(8, 2, 4, *GPU), **STRUCTURE)
    assert not any("tensor_parallel_size" in w for w in warnings)
    validate_config(colocated(2, 1, 2, "resources.gpus_per_node=0"), **STRUCTURE)  # CPU rules


def test_colocated_tp_must_divide_the_actor_world():
    cfg = colocated(6, 1, 4, *GPU, "data.train_batch_size=12", "actor.ppo_mini_batch_size=6")
    (msg,) = errors_of(cfg)
    assert "resources.placement=colocated with rollout.tensor_parallel_size=4" in msg
    assert "resources.actor_world_size=6 must be a multiple of 4" in msg
    assert "[1, 2, 3, 6]" in msg


def test_colocated_with_more_engines_than_devices():
    (msg,) = errors_of(colocated(8, 3, 4, *GPU))
    assert "more engines than devices" in msg
    assert "resources.rollout_workers=3 engines x rollout.tensor_parallel_size=4 = 12" in msg
    assert "resources.actor_world_size=8" in msg
    assert "resources.rollout_workers <= 2" in msg


def test_colocated_with_fewer_engines_warns_of_idle_gpus():
    warnings = validate_config(colocated(8, 1, 4, *GPU), **STRUCTURE)
    assert any("use 4 of the 8 actor GPUs" in w for w in warnings)


@pytest.mark.parametrize("placement", ["colocated", "split"])
def test_an_engine_must_not_span_nodes(placement):
    cfg = quick(
        f"resources.placement={placement}",
        "resources.gpus_per_node=6",
        "resources.actor_world_size=4",
        "resources.rollout_workers=1",
        "rollout.tensor_parallel_size=4",
        "data.train_batch_size=16",
        "actor.ppo_mini_batch_size=4",
    )
    msgs = [m for m in errors_of(cfg) if "does not divide resources.gpus_per_node" in m]
    assert len(msgs) == 1
    assert "rollout.tensor_parallel_size=4 does not divide resources.gpus_per_node=6" in msgs[0]
    assert "[1, 2, 3, 6]" in msgs[0]


def test_colocated_needs_only_the_actor_gpus():
    # 16 actor GPUs host 4 engines of TP 4: 16 GPUs, not 16 + 16.
    validate_config(colocated(16, 4, 4, *GPU, "resources.gpus_per_node=16"), **STRUCTURE)
    (msg,) = errors_of(colocated(16, 4, 4, *GPU, "resources.gpus_per_node=8"))
    assert "colocated placement needs 16 GPUs (resources.actor_world_size=16)" in msg
    assert "= 8" in msg


# --------------------------------------------------------------------------- the model's heads


def model_dir(tmp_path: Path, heads: int, kv: int) -> Path:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "max_position_embeddings": 4096,
            }
        )
    )
    return tmp_path


def test_vllm_head_rule():
    assert tp_splits_heads(40, 8, 4)  # Qwen2.5-32B at TP 4
    assert tp_splits_heads(28, 4, 4) and tp_splits_heads(28, 4, 2)  # Qwen2.5-Math-7B
    assert tp_splits_heads(8, 2, 4)  # each KV head replicated on 2 ranks
    assert not tp_splits_heads(6, 6, 4)  # attention heads
    assert not tp_splits_heads(12, 3, 2)  # 2 neither divides 3 nor is divided by it


def test_a_model_whose_heads_tp_does_not_divide(tmp_path):
    path = model_dir(tmp_path, heads=12, kv=3)
    cfg = colocated(8, 2, 4, *GPU, *own(path))
    validate_config(cfg, **STRUCTURE)  # the files are not read without check_files
    (msg,) = errors_of(colocated(8, 4, 2, *GPU, *own(path)), check_files=True)
    assert "rollout.tensor_parallel_size=2 cannot split the model's heads" in msg
    assert "num_attention_heads=12, num_key_value_heads=3" in msg and str(path) in msg
    assert "split these heads: [1, 3, 6, 12]" in msg
    assert "fitting resources: [1]" in msg  # 3, 6, 12 divide neither 8 GPUs nor 8 ranks


def test_kv_heads_replicated_when_fewer_than_tp(tmp_path):
    path = model_dir(tmp_path, heads=8, kv=2)
    validate_config(
        colocated(8, 2, 4, *GPU, *own(path)), check_files=True, check_platform=False
    )


def test_the_heads_follow_model_override_config(tmp_path):
    path = model_dir(tmp_path, heads=8, kv=8)
    cfg = colocated(
        8, 2, 4, *GPU, *own(path), "+model.override_config.num_attention_heads=6"
    )
    (msg,) = errors_of(cfg, check_files=True)
    assert "num_attention_heads=6, num_key_value_heads=8" in msg
    assert "model.override_config" in msg
