"""The DeepSpeed engine behind one small facade: build, forward, backward, step, LR, gather.

Why a facade: the update (``actor.policy_trainer``) must be readable and testable without
DeepSpeed, and DeepSpeed's internals (the ZeRO optimizer's loss-scale override used to
rescale an accumulated gradient, ZeRO-3's parameter gathers, the accumulation boundary) are
the parts that break between releases. They live here and nowhere else.

Why we own gradient accumulation: the number of micro-batches per mini-batch varies with
the token budget, so DeepSpeed runs with ``gradient_accumulation_steps=1`` and the update
marks the last micro-batch of each mini-batch as the accumulation boundary.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.micro_batch import PackedRows
from fipo_trainer.platform import Platform

logger = logging.getLogger(__name__)


class WarmupConstant:
    """LR factor per optimizer step (``lr_warmup_unit=optimizer_step``): linear warm-up over
    ``warmup_steps`` optimizer steps, then 1.

    Step ``k`` (0-based) uses ``min(1, (k + 1) / warmup_steps)``, so the first update is not
    wasted with lr = 0. A callable object (not a lambda) so LambdaLR can checkpoint it.
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def train_step_warmup_factor(global_step: int, warmup_steps: int) -> float:
    """LR factor of training step ``global_step`` (1-based) with ``lr_warmup_unit=train_step``.

    verl's constant-with-warm-up schedule, stepped once per training step: ``s / warmup``
    for ``s < warmup`` else 1, where ``s = global_step - 1`` steps were completed before this
    one — so the first step's optimizer steps run at lr 0, as in the reference.
    """
    s = max(int(global_step) - 1, 0)
    if warmup_steps <= 0 or s >= warmup_steps:
        return 1.0
    return s / warmup_steps


def offload_settings(config: ActorConfig, platform: Platform) -> tuple[bool, bool]:
    """(param_offload, optimizer_offload) that apply here: offload is a GPU-memory saver."""
    if platform.supports_offload:
        return config.param_offload, config.optimizer_offload
    if config.param_offload or config.optimizer_offload:
        logger.warning(
            "actor.param_offload / actor.optimizer_offload only apply on GPU; ignored on CPU"
        )
    return False, False


def build_deepspeed_config(
    config: ActorConfig, world_size: int, platform: Platform
) -> dict[str, Any]:
    """The DeepSpeed JSON config for the actor (micro-batching is done by the update)."""
    param_offload, optim_offload = offload_settings(config, platform)
    if param_offload and config.zero_stage != 3:
        raise ValueError("actor.param_offload needs actor.zero_stage=3 (ZeRO-2 keeps full params)")
    zero: dict[str, Any] = {
        "stage": config.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": platform.overlap_comm,
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


def load_hf_config(config: ActorConfig):
    """The model's HF config with dropout off and ``actor.override_config`` applied.

    Dropout off: old log-probs and the training forward must be the same function (the
    module stays in train mode for gradient checkpointing). The overrides are the same ones
    vLLM receives (``model.override_config``), e.g. the 7B recipes' context extension.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(config.model_path)
    for key, value in list(vars(hf_config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(hf_config, key, 0.0)
    for key, value in (config.override_config or {}).items():
        setattr(hf_config, key, value)
    return hf_config


def load_model(config: ActorConfig, platform: Platform, ds_config: dict[str, Any]):
    """Load the HF causal LM; under ZeRO-3 it is created partitioned.

    Returns (model, keepalive): keep ``keepalive`` referenced while the engine lives, it is
    what tells transformers to load under ZeRO-3.
    """
    from transformers import AutoModelForCausalLM

    keepalive = None
    if config.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)
    from fipo_trainer.actor import ulysses

    # The platform's kernel inside the packed-sequence attention (actor.ulysses): the
    # Ulysses all-to-alls under sequence parallel; on sdpa, attention per packed sequence.
    attn = ulysses.install(platform.attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(
        config.model_path,
        config=load_hf_config(config),
        dtype=platform.dtype,
        attn_implementation=attn,
    )
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keepalive


_DEEPSPEED_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed_muon_eagerly() -> None:
    """Import DeepSpeed's Muon module with ``torch.compile`` as a plain decorator, when
    compilation is disabled (``TORCH_COMPILE_DISABLE=1``, set for CPU workers).

    Why: ZeRO-1/2 imports that module on every gradient reduction, and its import wraps a
    kernel in ``torch.compile``, which loads inductor (measured: 0.5 CPU-s and 41 MiB per
    rank) even though, with compilation disabled, the kernel would run eagerly anyway.
    Nothing changes where compilation is on (GPU workers).
    """
    if os.environ.get("TORCH_COMPILE_DISABLE") != "1" or _DEEPSPEED_MUON in sys.modules:
        return

    def eager(*args: Any, **kwargs: Any) -> Any:
        if args and callable(args[0]):
            return args[0]
        return lambda fn: fn

    compile_fn = torch.compile
    torch.compile = eager  # type: ignore[assignment]
    try:
        with contextlib.suppress(ImportError):  # a DeepSpeed without Muon
            importlib.import_module(_DEEPSPEED_MUON)
    finally:
        torch.compile = compile_fn


class DeepSpeedEngine:
    """A ZeRO-2/3 DeepSpeed engine seen through the verbs the update needs.

    ``lr_warmup_unit=optimizer_step`` attaches a LambdaLR that DeepSpeed steps after every
    optimizer step; ``train_step`` attaches none: the update sets the LR of each training
    step itself (``set_lr``), so a resumed run needs no scheduler state.
    """

    def __init__(self, config: ActorConfig, world_size: int, platform: Platform) -> None:
        import deepspeed

        self.config = config
        # DeepSpeed's comm layer must wrap the already-initialised torch.distributed group
        # before zero.Init (ZeRO-3 loading) asks it for the world size.
        deepspeed.init_distributed(dist_backend=platform.dist_backend, auto_mpi_discovery=False)
        ds_config = build_deepspeed_config(config, world_size, platform)
        model, self._zero3_keepalive = load_model(config, platform, ds_config)
        _, optim_offload = offload_settings(config, platform)
        optimizer = None if optim_offload else build_optimizer(model, config)
        scheduler = None
        if config.lr_warmup_unit == "optimizer_step":
            schedule = WarmupConstant(config.lr_warmup_steps)

            def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
                return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

        import_deepspeed_muon_eagerly()
        self._engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        self.device: torch.device = self._engine.device

    # ------------------------------------------------------------------ compute
    @property
    def module(self) -> torch.nn.Module:
        """The Hugging Face model inside the engine."""
        return self._engine.module

    def train(self) -> None:
        self._engine.train()

    def logits(self, packed: PackedRows) -> torch.Tensor:
        """[K, V] logits at the positions that predict ``packed.targets``.

        The packed attention is told the whole sequence first (a sequence-parallel piece's
        ``sequence_position_ids``); it stays set, as gradient checkpointing re-runs the
        forward during backward."""
        from fipo_trainer.actor import ulysses

        whole = packed.sequence_position_ids
        ulysses.set_sequence(packed.position_ids if whole is None else whole)
        out = self._engine(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            use_cache=False,
            logits_to_keep=packed.logit_positions,
        )
        return out.logits[0]

    def set_accumulation_boundary(self, last: bool) -> None:
        self._engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self, grad_scale: float = 1.0) -> float:
        """Optimizer step on the accumulated gradient x ``grad_scale``; the grad norm.

        ``grad_scale`` != 1 goes through the ZeRO optimizer's loss scale (which divides the
        gradients and the reported norm), so the rescale is exact and costs nothing.
        """
        if abs(grad_scale - 1.0) < 1e-12:
            self._engine.step()
        else:
            opt = self._engine.optimizer
            if not hasattr(opt, "override_loss_scale"):
                raise RuntimeError(
                    f"{type(opt).__name__} cannot rescale gradients; the actor needs ZeRO stage "
                    "2 or 3"
                )
            saved = (opt.custom_loss_scaler, opt.external_loss_scale)
            opt.override_loss_scale(1.0 / grad_scale)
            try:
                self._engine.step()
            finally:
                opt.custom_loss_scaler, opt.external_loss_scale = saved
        norm = self._engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def get_lr(self) -> float:
        return float(self._engine.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        for group in self._engine.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ weights
    @property
    def zero3(self) -> bool:
        return self.config.zero_stage == 3

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters (tied ones once) and persistent buffers, in state-dict order, as
        stored here (ZeRO-3: partitioned placeholders; gather with ``gathered``)."""
        module = self.module
        keys = set(module.state_dict(keep_vars=True).keys())
        named = list(module.named_parameters())
        named += [(n, b) for n, b in module.named_buffers() if n in keys]
        return named

    @contextlib.contextmanager
    def gathered(self, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        """Full values of ``tensors`` inside the block (a collective under ZeRO-3)."""
        params = [t for t in tensors if hasattr(t, "ds_id")]
        if not self.zero3 or not params:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str, tag: str, client_state: dict[str, Any]) -> None:
        self._engine.save_checkpoint(path, tag=tag, client_state=client_state)

    def load(self, path: str, tag: str) -> dict[str, Any] | None:
        """Model, optimizer and LR scheduler; the client state (None: nothing found)."""
        load_path, client = self._engine.load_checkpoint(
            path, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        return None if load_path is None else dict(client or {})


def full_numel(t: torch.Tensor) -> int:
    """Element count of a tensor, also of a ZeRO-3 partitioned parameter."""
    return int(getattr(t, "ds_numel", t.numel()))
