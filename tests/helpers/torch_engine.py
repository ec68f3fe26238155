"""A plain PyTorch training engine with the verbs of ``actor.policy_trainer.TrainingEngine``.

Why: the Ray-free update is driven in one process by tests; this engine keeps the gradient
it steps on (``last_grads``), which DeepSpeed's partitioned optimizer does not expose.
"""

from __future__ import annotations

import torch

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.engine import WarmupConstant, load_hf_config
from fipo_trainer.actor.micro_batch import PackedRows


class TorchEngine:
    """HF model + AdamW + grad clipping, in fp32 on CPU."""

    def __init__(self, config: ActorConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.module = AutoModelForCausalLM.from_pretrained(
            config.model_path, config=load_hf_config(config), attn_implementation="sdpa"
        )
        self.device = torch.device("cpu")
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            betas=tuple(config.betas),
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        self.scheduler = None
        if config.lr_warmup_unit == "optimizer_step":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, WarmupConstant(config.lr_warmup_steps)
            )
        self.grad_clip = config.grad_clip
        self.last_grads: list[dict[str, torch.Tensor]] = []  # one per optimizer step
        self.lrs: list[float] = []

    def train(self) -> None:
        self.module.train()

    def logits(self, packed: PackedRows) -> torch.Tensor:
        out = self.module(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            use_cache=False,
            logits_to_keep=packed.logit_positions,
        )
        return out.logits[0]

    def set_accumulation_boundary(self, last: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, grad_scale: float = 1.0) -> float:
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(grad_scale)
        self.last_grads.append(
            {n: p.grad.detach().clone() for n, p in self.module.named_parameters()}
        )
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf")))
        self.lrs.append(self.get_lr())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return norm

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
