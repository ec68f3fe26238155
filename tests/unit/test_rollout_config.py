"""RolloutConfig / SamplingConfig validation and the training vs validation blocks."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from fipo_trainer.rollout.config import RolloutConfig, SamplingConfig, ValSamplingConfig
from fipo_trainer.rollout.worker import rollout_config_from


def test_defaults_validate_and_split_train_val():
    cfg = RolloutConfig(n=4, temperature=0.9, top_p=0.95, top_k=20, max_tokens=64, seed=7)
    cfg.validate()
    train = cfg.sampling()
    assert (train.n, train.temperature, train.top_p, train.top_k, train.max_tokens) == (
        4,
        0.9,
        0.95,
        20,
        64,
    )
    assert train.seed is None  # fresh samples every step; the engine seed fixes the run
    val = cfg.val_sampling()
    assert (val.n, val.temperature, val.max_tokens, val.greedy) == (1, 0.0, 64, True)
    cfg.val = ValSamplingConfig(n=8, temperature=1.0, top_p=0.7, max_tokens=32, seed=3)
    val = cfg.val_sampling()
    assert (val.n, val.top_p, val.max_tokens, val.seed) == (8, 0.7, 32, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "sglang"}, "rollout.engine"),
        ({"n": 0}, r"rollout\.n must be >= 1"),
        ({"temperature": -1.0}, "rollout.temperature"),
        ({"top_p": 0.0}, "rollout.top_p"),
        ({"top_k": 0}, "rollout.top_k"),
        ({"max_tokens": 0}, "rollout.max_tokens"),
        ({"max_model_len": 64, "max_tokens": 64}, "rollout.max_model_len"),
        ({"tensor_parallel_size": 0}, "rollout.tensor_parallel_size"),
        ({"gpu_memory_utilization": 1.5}, "rollout.gpu_memory_utilization"),
        ({"dtype": "fp8"}, "rollout.dtype"),
        ({"sleep_level": 3}, "rollout.sleep_level"),
        ({"temperature": 0.0, "n": 4}, "identical greedy"),
        ({"val": ValSamplingConfig(n=4, temperature=0.0)}, r"rollout\.val\.n"),
    ],
)
def test_bad_values_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(**kwargs).validate()


def test_the_sync_bucket_is_set_in_megabytes_as_in_verl():
    """The trainer's rollout section (the driver's sync reads it; engines never see it)."""
    from fipo_trainer.rollout.group import plain_rollout_config
    from fipo_trainer.trainer.config.schema import TrainRolloutConfig

    assert TrainRolloutConfig().update_weights_bucket_bytes == 256 * 2**20
    small = TrainRolloutConfig(update_weights_bucket_megabytes=0.125)
    assert small.update_weights_bucket_bytes == 2**17
    assert not hasattr(plain_rollout_config(small), "update_weights_bucket_megabytes")
    with pytest.raises(ValueError, match=r"rollout\.update_weights_bucket_megabytes must be > 0"):
        TrainRolloutConfig(update_weights_bucket_megabytes=0).validate()


def test_sampling_config_validates_alone():
    SamplingConfig(n=2, temperature=0.5).validate()
    with pytest.raises(ValueError, match=r"val\.top_p"):
        SamplingConfig(top_p=2.0).validate("val")


def test_structured_config_and_dict_round_trip():
    node = OmegaConf.structured(RolloutConfig)
    node.n = 2
    node.val.temperature = 0.6
    node.val.n = 3
    as_dict = OmegaConf.to_container(node)
    cfg = rollout_config_from(as_dict)
    assert isinstance(cfg.val, ValSamplingConfig) and cfg.val.n == 3 and cfg.n == 2
    with pytest.raises(ValueError, match="unknown rollout config keys"):
        rollout_config_from({"temprature": 1.0})


def test_for_shard_numbers_prompts_as_one_engine_would():
    import numpy as np

    from fipo_trainer.rollout.config import SEED_MODULUS

    s = SamplingConfig(n=8, seed=100)
    assert s.for_shard(0) is s
    shifted = s.for_shard(np.int64(3))  # RolloutGroup passes numpy offsets
    assert shifted.seed == 124 and type(shifted.seed) is int and shifted.n == 8
    assert s.for_shard(3).for_shard(2).seed == s.for_shard(5).seed  # shifts add up
    assert SamplingConfig(n=2, seed=SEED_MODULUS - 1).for_shard(1).seed == 1  # wraps
    unseeded = SamplingConfig(n=8, seed=None)
    assert unseeded.for_shard(5) is unseeded
