"""ActorConfig validation, the LR schedule and the DeepSpeed config it produces."""

from __future__ import annotations

import pytest

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.engine import WarmupConstant, build_deepspeed_config
from fipo_trainer.actor.group import plan_rows, responses_per_prompt
from fipo_trainer.actor.synthetic_batch import random_rollout_batch
from fipo_trainer.platform import Platform

CPU = Platform("cpu", "gloo", "float32", "sdpa", "cpu")
GPU = Platform("cuda", "nccl", "bfloat16", "flash_attention_2", "cuda")


def test_defaults_follow_the_recipe():
    cfg = ActorConfig(model_path="m")
    assert (cfg.lr, cfg.lr_warmup_steps, cfg.weight_decay, cfg.grad_clip) == (1e-6, 10, 0.1, 1.0)
    assert cfg.ppo_max_token_len_per_gpu == 22528 and cfg.loss_name == "fipo"
    assert cfg.log_prob_token_budget == 22528


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_path": ""}, "actor.model_path"),
        ({"zero_stage": 1}, "actor.zero_stage must be 2 or 3"),
        ({"lr": 0}, "actor.lr"),
        ({"ppo_mini_batch_size": 0}, "actor.ppo_mini_batch_size"),
        ({"betas": (0.9, 1.5)}, "actor.betas"),
        ({"loss_name": "nope"}, "unknown policy loss 'nope'"),
        ({"log_prob_max_token_len_per_gpu": 0}, "log_prob_max_token_len_per_gpu"),
    ],
)
def test_validation_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActorConfig(**{"model_path": "m", **kwargs})


def test_from_dict_nested_and_unknown_keys():
    cfg = ActorConfig.from_dict(
        {"model_path": "m", "betas": [0.9, 0.95], "policy_loss": {"clip_ratio_c": 5.0}}
    )
    assert cfg.betas == (0.9, 0.95) and cfg.policy_loss.clip_ratio_c == 5.0
    with pytest.raises(ValueError, match=r"unknown actor config key\(s\) \['lrr'\]"):
        ActorConfig.from_dict({"model_path": "m", "lrr": 1})
    with pytest.raises(ValueError, match=r"unknown actor.policy_loss key\(s\) \['eps'\]"):
        ActorConfig.from_dict({"model_path": "m", "policy_loss": {"eps": 1}})


def test_warmup_then_constant():
    sched = WarmupConstant(10)
    assert [sched(k) for k in (0, 4, 9, 10, 500)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert WarmupConstant(0)(0) == 1.0


def test_deepspeed_config_per_platform():
    cfg = ActorConfig(model_path="m", zero_stage=3, param_offload=True, optimizer_offload=True)
    cpu = build_deepspeed_config(cfg, 2, CPU)
    assert cpu["zero_optimization"]["stage"] == 3 and not cpu["bf16"]["enabled"]
    assert "offload_param" not in cpu["zero_optimization"] and "optimizer" not in cpu
    assert cpu["gradient_accumulation_steps"] == 1
    gpu = build_deepspeed_config(cfg, 8, GPU)
    assert gpu["bf16"]["enabled"] and gpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert gpu["optimizer"]["params"]["lr"] == cfg.lr
    with pytest.raises(ValueError, match=r"param_offload needs actor\.zero_stage=3"):
        build_deepspeed_config(ActorConfig(model_path="m", param_offload=True), 8, GPU)


def test_plan_rows_mini_batches_and_errors():
    batch = random_rollout_batch(num_prompts=6, n=4, vocab_size=10)
    assert responses_per_prompt(batch) == 4
    cfg = ActorConfig(model_path="m", ppo_mini_batch_size=2)
    parts, local = plan_rows(batch, cfg, 2)
    assert local == 4 and sorted(i for p in parts for i in p) == list(range(24))
    for r in parts:  # local mini-batch j holds rows of global mini-batch j
        assert [i // 8 for i in r] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="not a multiple of a mini-batch of 20 rows"):
        plan_rows(batch, ActorConfig(model_path="m", ppo_mini_batch_size=5), 2)
    with pytest.raises(ValueError, match="evenly across 3 data-parallel groups"):
        plan_rows(batch, cfg, 3)
