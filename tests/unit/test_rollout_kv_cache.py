"""The CPU engine's KV cache is sized to what it can ever hold, not a fixed 1 GiB."""

from __future__ import annotations

import json
from pathlib import Path

from fipo_trainer.rollout.config import RolloutConfig
from fipo_trainer.rollout.vllm_setup import (
    CPU_BLOCK_SIZE,
    MIN_KV_CACHE_BYTES,
    cpu_kv_cache_args,
    kv_cache_bytes,
)

MiB = 2**20


def _size(**kw: int) -> int:
    args = dict(
        max_num_seqs=256,
        max_model_len=56,
        num_layers=2,
        num_kv_heads=2,
        head_dim=32,
        dtype_bytes=4,
        floor=0,
    )
    return kv_cache_bytes(**{**args, **kw})


def test_formula_counts_whole_blocks_plus_the_null_block() -> None:
    block = 2 * 2 * 2 * CPU_BLOCK_SIZE * 32 * 4  # layers x (K, V) x heads x tokens x dim x bytes
    assert _size() == (256 * 1 + 1) * block  # 56 tokens: one block per sequence
    assert _size(max_model_len=129) == (256 * 2 + 1) * block  # a partial block is a block
    assert _size(max_model_len=128) == (256 * 1 + 1) * block


def test_scales_with_every_dimension() -> None:
    base = _size(max_model_len=1024)
    assert _size(max_model_len=1024, max_num_seqs=128) < base
    assert _size(max_model_len=1024, num_layers=4) > base
    assert _size(max_model_len=1024, dtype_bytes=2) < base
    assert _size(max_model_len=1024, head_dim=64) > base


def test_tensor_parallel_splits_kv_heads_but_keeps_one() -> None:
    assert _size(num_kv_heads=4, tensor_parallel_size=2) == _size(num_kv_heads=2)
    assert _size(num_kv_heads=1, tensor_parallel_size=2) == _size(num_kv_heads=1)


def test_floor() -> None:
    assert (
        kv_cache_bytes(
            max_num_seqs=1,
            max_model_len=8,
            num_layers=1,
            num_kv_heads=1,
            head_dim=32,
            dtype_bytes=4,
        )
        == MIN_KV_CACHE_BYTES
    )


def _model_dir(tmp_path: Path) -> Path:
    cfg = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 1024,
        "vocab_size": 100,
        "head_dim": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_quickstart_shape_is_megabytes_not_a_gibibyte(tmp_path: Path) -> None:
    config = RolloutConfig(max_model_len=56, max_num_seqs=256, max_tokens=24)
    got = cpu_kv_cache_args(config, _model_dir(tmp_path), "float32", environ={})
    assert MIN_KV_CACHE_BYTES <= got["kv_cache_memory_bytes"] <= 64 * MiB


def test_unset_max_model_len_takes_the_model_positions(tmp_path: Path) -> None:
    config = RolloutConfig(max_num_seqs=4)
    got = cpu_kv_cache_args(config, _model_dir(tmp_path), "float32", environ={})
    assert got["kv_cache_memory_bytes"] == max(
        MIN_KV_CACHE_BYTES,
        _size(max_num_seqs=4, max_model_len=1024),
    )


def test_user_gib_setting_wins(tmp_path: Path) -> None:
    config = RolloutConfig(max_model_len=56)
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert cpu_kv_cache_args(config, _model_dir(tmp_path), "float32", environ=env) == {}
