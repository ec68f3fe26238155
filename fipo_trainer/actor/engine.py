"""Building the DeepSpeed engine for the actor: config, optimizer, LR schedule, model.

Why we own gradient accumulation: the number of micro-batches per mini-batch varies with
the token budget, so DeepSpeed runs with ``gradient_accumulation_steps=1`` and the worker
marks the last micro-batch of each mini-batch as the accumulation boundary; losses are
already normalised by the mini-batch-wide denominator (see ``worker.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.platform import Platform

logger = logging.getLogger(__name__)


class WarmupConstant:
    """LR factor: linear warm-up over ``warmup_steps`` optimizer steps, then 1.

    Step ``k`` (0-based) uses ``min(1, (k + 1) / warmup_steps)``, so the first update is not
    wasted with lr = 0. A callable object (not a lambda) so LambdaLR can checkpoint it.
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def offload_settings(config: ActorConfig, platform: Platform) -> tuple[bool, bool]:
    """(param_offload, optimizer_offload) that apply here: offload is a GPU-memory saver."""
    if platform.is_cuda:
        return config.param_offload, config.optimizer_offload
    if config.param_offload or config.optimizer_offload:
        logger.warning(
            "actor.param_offload / actor.optimizer_offload only apply on GPU; ignored on CPU"
        )
    return False, False


def build_deepspeed_config(
    config: ActorConfig, world_size: int, platform: Platform
) -> dict[str, Any]:
    """The DeepSpeed JSON config for the actor (micro-batching is done by the worker)."""
    param_offload, optim_offload = offload_settings(config, platform)
    if param_offload and config.zero_stage != 3:
        raise ValueError("actor.param_offload needs actor.zero_stage=3 (ZeRO-2 keeps full params)")
    zero: dict[str, Any] = {
        "stage": config.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": platform.is_cuda,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if config.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_param_persistence_threshold=1e4,
            stage3_prefetch_bucket_size=5e7,
        )
    if param_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if optim_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": float(config.grad_clip),
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite gradient norm skips the optimizer step (fp32 too).
        "bf16": {"enabled": platform.dtype == torch.bfloat16, "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if optim_offload:
        # DeepSpeed's CPU Adam runs the offloaded optimizer step (built once, on GPU hosts).
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": config.lr,
                "betas": list(config.betas),
                "eps": config.eps,
                "weight_decay": config.weight_decay,
            },
        }
    return ds


def build_optimizer(model: torch.nn.Module, config: ActorConfig) -> torch.optim.Optimizer:
    """torch AdamW on all trainable parameters (DeepSpeedCPUAdam takes ~84 s to build)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        betas=tuple(config.betas),
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def load_model(config: ActorConfig, platform: Platform, ds_config: dict[str, Any]):
    """Load the HF causal LM (dropout disabled); under ZeRO-3 it is created partitioned.

    Returns (model, keepalive): keep ``keepalive`` referenced while the engine lives, it is
    what tells transformers to load under ZeRO-3.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    # Dropout off: old log-probs and the training forward must be the same function
    # (the module stays in train mode for gradient checkpointing).
    hf_config = AutoConfig.from_pretrained(config.model_path)
    for key, value in list(vars(hf_config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(hf_config, key, 0.0)
    keepalive = None
    if config.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        config.model_path,
        config=hf_config,
        dtype=platform.dtype,
        attn_implementation=platform.attn_implementation,
    )
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keepalive


def build_engine(config: ActorConfig, world_size: int, platform: Platform):
    """(engine, keepalive): a DeepSpeed engine with AdamW + warm-up/constant LambdaLR."""
    import deepspeed

    # DeepSpeed's comm layer must wrap the already-initialised torch.distributed group
    # before zero.Init (ZeRO-3 loading) asks it for the world size.
    deepspeed.init_distributed(dist_backend=platform.dist_backend, auto_mpi_discovery=False)
    ds_config = build_deepspeed_config(config, world_size, platform)
    model, keepalive = load_model(config, platform, ds_config)
    _, optim_offload = offload_settings(config, platform)
    optimizer = None if optim_offload else build_optimizer(model, config)
    schedule = WarmupConstant(config.lr_warmup_steps)

    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=make_scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    return engine, keepalive
