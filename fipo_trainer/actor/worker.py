"""The DeepSpeed actor worker (one Ray actor per data-parallel rank): a thin adapter.

The algorithm lives in pure functions (``algorithms.policy_loss``, ``actor.logprob``,
``actor.micro_batch``); this class only runs them on its shard of rows.

Normalisation (why updates do not depend on the micro-batch cut): each micro-batch's loss is
``numerator / D * W`` where ``D`` is the loss denominator of the whole mini-batch summed over
all ranks (``aggregation.local_denominator``) and ``W`` the data-parallel size (DeepSpeed
averages gradients over ranks). ``D`` is first taken from the response mask; a loss that
drops tokens while it runs (FIPO's sequence invalidation) reports its real mask, and if the
true ``D`` differs the accumulated gradient is rescaled by ``D_est / D`` through the ZeRO
optimizer's loss scale before the step, so the result equals the full-batch loss exactly.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fipo_trainer.actor.checkpoint import (
    DS_TAG,
    commit,
    prepare_tmp,
    read_marker,
    tmp_dir_for,
    write_marker,
)
from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.engine import build_engine
from fipo_trainer.actor.logprob import token_log_probs
from fipo_trainer.actor.micro_batch import (
    PackedRows,
    pack_rows,
    plan_fixed_size,
    plan_token_budget,
    unpack_to_rows,
)
from fipo_trainer.algorithms.aggregation import aggregate_loss, local_denominator
from fipo_trainer.algorithms.metrics import reduce_metrics
from fipo_trainer.algorithms.policy_loss import compute_policy_terms
from fipo_trainer.cluster.worker import Worker, init_torch_distributed
from fipo_trainer.data.batch import Batch
from fipo_trainer.platform import current_platform
from fipo_trainer.plugins import import_plugins

logger = logging.getLogger(__name__)

# Batch.meta keys understood by the worker (set by ActorGroup or the trainer).
META_MINI_BATCH_ROWS = "actor_mini_batch_rows_per_rank"
META_TEMPERATURE = "temperature"
META_MAX_TOKEN_LEN = "max_token_len_per_gpu"
META_ENTROPY = "calculate_entropy"

UPDATE_KEYS = (
    "input_ids",
    "attention_mask",
    "responses",
    "response_mask",
    "old_log_probs",
    "advantages",
)
LOG_PROB_KEYS = ("input_ids", "attention_mask", "responses")
SYNC_BUCKET_BYTES = 256 * 2**20


class DeepSpeedActorWorker(Worker):
    """ZeRO-2/3 policy: ``compute_log_prob``, ``update_policy``, checkpoints, HF export."""

    def __init__(self, config: ActorConfig | dict[str, Any]) -> None:
        super().__init__()
        # DeepSpeed's comm layer calls torch's deprecated collective names on every step.
        warnings.filterwarnings(
            "ignore",
            message=r".*is deprecated.*",
            category=FutureWarning,
            module=r"torch\.distributed",
        )
        self.config = ActorConfig.coerce(config)
        # Losses registered by user files must exist in this process too (a pickled config
        # does not re-run its validation).
        import_plugins(self.config.loss_plugins, "actor.loss_plugins")
        self.platform = current_platform()
        if self.platform.is_cuda:
            torch.cuda.set_device(self.dist_info.local_rank)
        torch.manual_seed(self.config.seed)
        init_torch_distributed(
            self.dist_info, self.platform.dist_backend, self.config.dist_timeout_s
        )
        self.engine, self._zero3_keepalive = build_engine(
            self.config, self.world_size, self.platform
        )
        self.device = self.engine.device
        self.weights_version = 0  # optimizer steps taken by this engine (restored on load)

    # ------------------------------------------------------------------ helpers
    @property
    def module(self) -> torch.nn.Module:
        """The Hugging Face model inside the engine."""
        return self.engine.module

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def _all_max_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _plan(self, lengths: list[int], budget: int, budget_key: str) -> list[list[int]]:
        """Micro-batches of local rows; every rank gets the same count (ZeRO collectives run
        once per forward/backward, so ranks must do the same number)."""
        if not self.config.use_dynamic_bsz:
            return plan_fixed_size(len(lengths), self.config.micro_batch_size_per_gpu)
        count = 1
        while True:
            parts = plan_token_budget(
                lengths, budget, min_micro_batches=count, budget_key=budget_key
            )
            agreed = self._all_max_int(len(parts))
            if agreed == count:  # every rank planned exactly `count` (never fewer than asked)
                return parts
            count = agreed

    def _forward(
        self, packed: PackedRows, temperature: float, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        packed = packed.to(self.device)
        out = self.engine(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            use_cache=False,
            logits_to_keep=packed.logit_positions,
        )
        return token_log_probs(
            out.logits[0],
            packed.targets,
            temperature=temperature,
            chunk_size=self.config.logits_chunk_size,
            with_entropy=with_entropy,
        )

    @staticmethod
    def _require(batch: Batch, keys: tuple[str, ...], what: str) -> None:
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"{what} needs batch fields {missing}; the batch has {batch.keys()}")

    def _mini_batches(self, batch: Batch) -> list[range]:
        n = len(batch)
        rows = int(batch.meta.get(META_MINI_BATCH_ROWS, n)) or n
        if n % rows:
            raise ValueError(f"{n} local rows are not a whole number of mini-batches of {rows}")
        return [range(s, s + rows) for s in range(0, n, rows)]

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def compute_log_prob(self, batch: Batch) -> Batch:
        """``old_log_probs`` [n, R] (+ ``entropy`` [n, R]) for this rank's rows.

        Micro-batches are planned exactly as ``update_policy`` plans them (same budget
        unless ``log_prob_max_token_len_per_gpu`` is set), so on-policy ratios are exactly 1.
        """
        self._require(batch, LOG_PROB_KEYS, "compute_log_prob")
        cfg = self.config
        temperature = float(batch.meta.get(META_TEMPERATURE, 1.0))
        budget = int(batch.meta.get(META_MAX_TOKEN_LEN, cfg.log_prob_token_budget))
        with_entropy = bool(batch.meta.get(META_ENTROPY, cfg.compute_entropy))
        input_ids, attn = batch["input_ids"], batch["attention_mask"]
        width = batch["responses"].shape[1]
        prompt_width = input_ids.shape[1] - width
        lengths = attn.sum(-1).tolist()
        self.engine.train()  # same mode as update_policy (dropout is disabled at load)
        out = torch.zeros(len(batch), width, dtype=torch.float32)
        ent_out = torch.zeros(len(batch), width, dtype=torch.float32) if with_entropy else None
        for rows in self._mini_batches(batch):
            plan = self._plan(
                [lengths[i] for i in rows], budget, "actor.log_prob_max_token_len_per_gpu"
            )
            for part in plan:
                idx = torch.tensor([rows[i] for i in part], dtype=torch.long)
                packed = pack_rows(input_ids[idx], attn[idx], prompt_width)
                logp, ent = self._forward(packed, temperature, with_entropy)
                out[idx] = unpack_to_rows(logp, packed.response_lengths, width).cpu()
                if ent_out is not None and ent is not None:
                    ent_out[idx] = unpack_to_rows(ent, packed.response_lengths, width).cpu()
        tensors = {"old_log_probs": out}
        if ent_out is not None:
            tensors["entropy"] = ent_out
        return Batch(tensors)

    # ------------------------------------------------------------------ update
    def update_policy(self, batch: Batch) -> dict[str, float]:
        """One optimizer step per mini-batch (x ``ppo_epochs``); metrics averaged over
        micro-batches (token-weighted), ranks and mini-batches; identical on every rank."""
        self._require(batch, UPDATE_KEYS, "update_policy")
        cfg = self.config
        t_start = time.perf_counter()
        temperature = float(batch.meta.get(META_TEMPERATURE, 1.0))
        budget = int(batch.meta.get(META_MAX_TOKEN_LEN, cfg.ppo_max_token_len_per_gpu))
        with_entropy = bool(batch.meta.get(META_ENTROPY, cfg.compute_entropy))
        mode = cfg.policy_loss.loss_agg_mode
        norm_len = cfg.policy_loss.loss_norm_length
        input_ids, attn = batch["input_ids"], batch["attention_mask"]
        width = batch["responses"].shape[1]
        prompt_width = input_ids.shape[1] - width
        resp_mask = batch["response_mask"].float()
        old_lp = batch["old_log_probs"].float()
        adv = batch["advantages"].float()
        lengths = attn.sum(-1).tolist()
        minibatches = self._mini_batches(batch)

        micro_records: list[tuple[int, dict[str, float], float]] = []  # (step, metrics, weight)
        step_records: list[dict[str, float]] = []
        self.engine.train()
        step = 0
        for epoch in range(cfg.ppo_epochs):
            for mb_index, rows in enumerate(minibatches):
                plan = self._plan(
                    [lengths[i] for i in rows], budget, "actor.ppo_max_token_len_per_gpu"
                )
                mb_rows = torch.tensor(list(rows), dtype=torch.long)
                (d_est,) = self._all_sum([local_denominator(resp_mask[mb_rows], mode, norm_len)])
                scale = d_est / self.world_size  # loss = numerator / (D / W)
                numerator = d_local = 0.0
                tokens = resp_tokens = 0
                ent_sum = 0.0
                drift = 0.0
                for i, part in enumerate(plan):
                    idx = torch.tensor([rows[j] for j in part], dtype=torch.long)
                    packed = pack_rows(input_ids[idx], attn[idx], prompt_width)
                    self.engine.set_gradient_accumulation_boundary(i == len(plan) - 1)
                    logp, ent = self._forward(packed, temperature, with_entropy)
                    logp = unpack_to_rows(logp, packed.response_lengths, width)
                    mask = resp_mask[idx].to(self.device)
                    old = old_lp[idx].to(self.device)
                    terms = compute_policy_terms(
                        cfg.loss_name, old, logp, adv[idx].to(self.device), mask, cfg.policy_loss
                    )
                    loss = aggregate_loss(
                        terms.loss_mat,
                        terms.loss_mask,
                        mode,
                        global_denominator=scale,
                        norm_length=norm_len,
                    )
                    self.engine.backward(loss)
                    numerator += float(loss.detach()) * (scale if scale > 0 else 1.0)
                    d_local += local_denominator(terms.loss_mask, mode, norm_len)
                    weight = float(mask.sum())
                    tokens += packed.num_tokens
                    resp_tokens += int(weight)
                    if epoch == 0 and mb_index == 0 and weight > 0:
                        drift = max(drift, float(((logp.detach() - old).abs() * mask).max()))
                    if ent is not None:
                        ent_rows = unpack_to_rows(ent, packed.response_lengths, width)
                        ent_sum += float((ent_rows * mask).sum())
                    micro_records.append(
                        (step, {f"actor/{k}": v for k, v in terms.metrics.items()}, weight)
                    )
                d_true, num_total, tok_total, resp_total, ent_total = self._all_sum(
                    [d_local, numerator, float(tokens), float(resp_tokens), ent_sum]
                )
                lr = float(self.engine.get_lr()[0])
                self._step(grad_scale=d_est / d_true if d_true > 0 else 1.0)
                self.weights_version += 1
                grad_norm = self.engine.get_global_grad_norm()
                record = {
                    "actor/pg_loss": num_total / d_true if d_true > 0 else 0.0,
                    "actor/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "actor/lr": lr,
                    "actor/loss_denominator": d_true,
                    "actor/micro_batches_per_rank": float(len(plan)),
                    "_tokens": tok_total,
                    "_response_tokens": resp_total,
                }
                if with_entropy:
                    record["actor/entropy"] = ent_total / max(resp_total, 1.0)
                if epoch == 0 and mb_index == 0:
                    record["actor/on_policy_log_ratio_abs_max"] = drift
                step_records.append(record)
                step += 1
        return self._finish_metrics(micro_records, step_records, time.perf_counter() - t_start)

    def _step(self, grad_scale: float) -> None:
        """Optimizer step; ``grad_scale`` != 1 rescales the accumulated gradient exactly
        (through ZeRO's loss scale, which divides gradients and the reported norm)."""
        if abs(grad_scale - 1.0) < 1e-12:
            self.engine.step()
            return
        opt = self.engine.optimizer
        if not hasattr(opt, "override_loss_scale"):
            raise RuntimeError(
                f"{type(opt).__name__} cannot rescale gradients; the actor needs ZeRO stage 2 or 3"
            )
        saved = (opt.custom_loss_scaler, opt.external_loss_scale)
        opt.override_loss_scale(1.0 / grad_scale)
        try:
            self.engine.step()
        finally:
            opt.custom_loss_scaler, opt.external_loss_scale = saved

    def _finish_metrics(
        self,
        micro_records: list[tuple[int, dict[str, float], float]],
        step_records: list[dict[str, float]],
        elapsed: float,
    ) -> dict[str, float]:
        gathered: list[Any] = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(gathered, micro_records)
        else:
            gathered = [micro_records]
        per_step: list[dict[str, float]] = []
        for s, record in enumerate(step_records):
            parts = [(m, w) for recs in gathered for (st, m, w) in recs if st == s]
            merged = reduce_metrics([m for m, _ in parts], [w for _, w in parts]) if parts else {}
            merged.update({k: v for k, v in record.items() if not k.startswith("_")})
            per_step.append(merged)
        out = reduce_metrics(per_step)
        out["actor/lr"] = step_records[-1]["actor/lr"] if step_records else 0.0
        tokens = sum(r["_tokens"] for r in step_records)
        out["actor/tokens"] = tokens
        out["actor/response_tokens"] = sum(r["_response_tokens"] for r in step_records)
        out["actor/optimizer_steps"] = float(len(step_records))
        (slowest,) = self._all_max_float([elapsed])
        out["actor/update_time_s"] = slowest
        out["actor/tokens_per_s"] = tokens / slowest if slowest > 0 else 0.0
        return out

    def _all_max_float(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    # ------------------------------------------------------------------ weights
    def _zero3(self) -> bool:
        return self.config.zero_stage == 3

    def _named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters (tied ones once) and persistent buffers, in state-dict order."""
        module = self.module
        keys = set(module.state_dict(keep_vars=True).keys())
        named = list(module.named_parameters())
        named += [(n, b) for n, b in module.named_buffers() if n in keys]
        return named

    def state_dict_for_sync(
        self, bucket_bytes: int = SYNC_BUCKET_BYTES
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights with Hugging Face names, yielded on rank 0 (on its device, training
        dtype). Call it on every rank and exhaust it there: under ZeRO-3 the gathers are
        collectives (parameters are gathered a bucket at a time to bound memory). ZeRO-2
        tensors are the live parameters: read them, do not modify them."""
        named = self._named_tensors()
        if not self._zero3():
            if self.rank == 0:
                for name, t in named:
                    yield name, t.detach()
            return
        import deepspeed

        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for i, (name, t) in enumerate(named):
            bucket.append((name, t))
            size += _full_numel(t) * t.element_size()
            if size < bucket_bytes and i < len(named) - 1:
                continue
            params = [p for _, p in bucket if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                ready = [(n, p.detach().clone()) for n, p in bucket] if self.rank == 0 else []
            yield from ready
            bucket, size = [], 0

    def full_state_dict(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """Full CPU state dict (HF names) on rank 0 (or on all ranks: for cross-rank checks)."""
        if not all_ranks:
            sd = {n: t.detach().to("cpu", copy=True) for n, t in self.state_dict_for_sync()}
            return sd if self.rank == 0 else None
        named = self._named_tensors()
        if not self._zero3():
            return {n: t.detach().cpu().clone() for n, t in named}
        import deepspeed

        out = {}
        for name, t in named:
            params = [t] if hasattr(t, "ds_id") else []
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                out[name] = t.detach().cpu().clone()
        return out

    # ------------------------------------------------------------------ weight sync
    # (added by the rollout helper; protocol in fipo_trainer.cluster.weight_sync)
    def init_weight_sync(
        self,
        host: str | None,
        port: int,
        world_size: int,
        *,
        timeout_s: float = 300.0,
        group_name: str = "default",
        connect: bool = True,
    ) -> tuple[str, int] | None:
        """Rank 0: become rank 0 of the actor->rollout sync group (``port=0``: a free port).

        Returns (host, port). With ``connect=False`` only the store is opened; then call
        ``connect_weight_sync`` concurrently with the rollout workers' ``init_weight_sync``.
        """
        if self.rank != 0:
            return None
        from fipo_trainer.cluster.weight_sync import WeightSyncSender

        self._weight_sync = WeightSyncSender(
            world_size, host, port, timeout_s=timeout_s, group_name=group_name, connect=connect
        )
        return self._weight_sync.host, self._weight_sync.port

    def connect_weight_sync(self) -> None:
        if self.rank == 0:
            self._weight_sync.connect()

    def sync_weights(self, bucket_bytes: int = SYNC_BUCKET_BYTES) -> dict[str, float]:
        """Broadcast the current weights from rank 0 to the rollout workers (``sync/*``
        metrics on rank 0, {} elsewhere). Under ZeRO-3 call it on every rank: the gathers
        are collectives."""
        stream = self.state_dict_for_sync(bucket_bytes)
        if self.rank != 0:
            for _ in stream:
                pass
            return {}
        sender = getattr(self, "_weight_sync", None)
        if sender is None:
            raise RuntimeError("sync_weights() before init_weight_sync() on actor rank 0")
        return sender.send(stream, bucket_bytes).metrics()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str) -> str:
        """DeepSpeed checkpoint (model, optimizer, LR scheduler) written atomically."""
        final = Path(path).expanduser().resolve()
        tmp = tmp_dir_for(final)
        if self.rank == 0:
            prepare_tmp(final)
        self._barrier()
        self.engine.save_checkpoint(
            str(tmp), tag=DS_TAG, client_state={"weights_version": self.weights_version}
        )
        self._barrier()
        if self.rank == 0:
            write_marker(
                tmp,
                {
                    "zero_stage": self.config.zero_stage,
                    "world_size": self.world_size,
                    "weights_version": self.weights_version,
                    "model_path": self.config.model_path,
                },
            )
            commit(tmp, final)
        self._barrier()
        return str(final)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore model, optimizer and LR scheduler from ``save_checkpoint``'s directory."""
        info = read_marker(path)
        if info["zero_stage"] != self.config.zero_stage or info["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written with zero_stage={info['zero_stage']} on "
                f"{info['world_size']} ranks; this actor runs zero_stage={self.config.zero_stage} "
                f"on {self.world_size}. Resume with the same actor.zero_stage and world size."
            )
        load_path, client = self.engine.load_checkpoint(
            str(Path(path).expanduser().resolve()),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {path}/{DS_TAG}")
        self.weights_version = int((client or {}).get("weights_version", info["weights_version"]))
        return info

    def export_hf(self, path: str) -> str:
        """Full weights as a Hugging Face model directory (+ tokenizer), written atomically."""
        state = self.full_state_dict()
        final = Path(path).expanduser().resolve()
        if self.rank == 0:
            assert state is not None
            tmp = prepare_tmp(final)
            self.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            _copy_tokenizer(self.config.tokenizer_path or self.config.model_path, tmp)
            commit(tmp, final)
        self._barrier()
        return str(final)


def _full_numel(t: torch.Tensor) -> int:
    return int(getattr(t, "ds_numel", t.numel()))


def _copy_tokenizer(source: str, target: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer copied into %s (%s)", target, err)
        return
    tok.save_pretrained(target)
