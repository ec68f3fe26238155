"""The PPO update and the log-prob pass of one data-parallel rank, without Ray.

Why Ray-free: this is the algorithm's outer loop (mini-batches, the micro-batch plan,
forward, loss, normaliser, optimizer step) and it must be readable and testable in one
process. It talks to a ``TrainingEngine`` (``actor.engine.DeepSpeedEngine`` in the
workers; any object with the same verbs in a test) and to ``Collectives``.

The loss normaliser (``actor.loss_scale``):

- ``reference`` (verl 0.5, the paper's release): each micro-batch's loss is its own
  aggregate (``loss_agg_mode`` over *that* micro-batch's surviving mask, FIPO's dropped
  sequences excluded), times (micro-batch rows / mini-batch rows of this rank) when
  micro-batches are cut by token budget, or divided by the number of micro-batches when
  they are fixed-size. Data-parallel ranks average gradients (DeepSpeed does).
- ``global``: each micro-batch's loss is ``numerator / D * W`` with ``D`` the denominator
  of the whole mini-batch summed over all ranks and ``W`` the data-parallel size, so the
  update does not depend on the micro-batch cut. ``D`` is estimated from the response mask;
  when a loss drops tokens as it runs (FIPO's sequence invalidation) the accumulated
  gradient is rescaled by ``D_est / D_true`` before the step, exactly.

Old log-probs use the same micro-batch plan as the update, so on the first mini-batch the
ratio is exactly 1.

Sequence parallel (``actor.ulysses_sequence_parallel_size = k``): the k ranks of a group
hold the same rows and plan the same micro-batches (budget ``ppo_max_token_len_per_gpu`` x
k); each packed micro-batch is cut into k pieces (``actor.sequence_parallel``), each rank
computes log-probs for its piece and the loss of its own tokens
(``algorithms.sequence_shards`` makes Future-KL, FIPO's invalidation, the normalisers and
the metrics those of the whole rows). The group's gradients sum to the micro-batch's
gradient; DeepSpeed averages over all k x D ranks, so ``reference`` multiplies the loss by
k and ``global`` divides its normaliser by the world size (each token is counted once).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from fipo_trainer.actor.comm import Collectives
from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.engine import train_step_warmup_factor
from fipo_trainer.actor.logprob import token_log_probs
from fipo_trainer.actor.micro_batch import (
    PackedRows,
    pack_rows,
    plan_fixed_size,
    plan_token_budget,
    unpack_to_rows,
)
from fipo_trainer.actor.sequence_parallel import shard_packed
from fipo_trainer.actor.token_record import TokenRecorder
from fipo_trainer.algorithms.aggregation import aggregate_loss, local_denominator
from fipo_trainer.algorithms.loss_metrics import token_weighted_parts, with_empty_subset_zeros
from fipo_trainer.algorithms.metrics import mean_metrics, reduce_metrics
from fipo_trainer.algorithms.policy_loss import compute_policy_terms
from fipo_trainer.algorithms.sequence_shards import SequenceShards, row_segments
from fipo_trainer.data.batch import Batch

LOG_PROB_INPUTS = ("input_ids", "attention_mask", "responses")
UPDATE_INPUTS = (*LOG_PROB_INPUTS, "response_mask", "old_log_probs", "advantages")


class TrainingEngine(Protocol):
    """What the update needs from a training engine."""

    device: torch.device

    def train(self) -> None: ...
    def logits(self, packed: PackedRows) -> torch.Tensor: ...
    def set_accumulation_boundary(self, last: bool) -> None: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, grad_scale: float = 1.0) -> float: ...
    def get_lr(self) -> float: ...
    def set_lr(self, lr: float) -> None: ...


def require_fields(batch: Batch, names: tuple[str, ...], what: str) -> None:
    missing = [k for k in names if k not in batch]
    if missing:
        raise ValueError(f"{what} needs batch fields {missing}; the batch has {batch.keys()}")


def _budget_key(key: str, sp: int) -> str:
    """How a token budget is named in errors (x k under sequence parallel)."""
    return key if sp == 1 else f"{key} x actor.ulysses_sequence_parallel_size"


def mini_batch_ranges(n: int, rows: int) -> list[range]:
    """Consecutive mini-batches of ``rows`` local rows (``rows`` must divide ``n``)."""
    rows = rows or n
    if rows < 1 or n % rows:
        raise ValueError(f"{n} local rows are not a whole number of mini-batches of {rows}")
    return [range(s, s + rows) for s in range(0, n, rows)]


class PolicyTrainer:
    """Log-probs and PPO updates for one rank's rows (see the module docstring)."""

    def __init__(self, config: ActorConfig, engine: TrainingEngine, comm: Collectives) -> None:
        self.config = config
        self.engine = engine
        self.comm = comm
        self.weights_version = 0  # optimizer steps taken (restored from checkpoints)
        self.token_records: dict[int, dict[str, Any]] = {}  # of the last update's record_rows

    # ------------------------------------------------------------------ pieces
    def plan(self, lengths: list[int], budget: int, budget_key: str) -> list[list[int]]:
        """Micro-batches of local rows; every rank gets the same count (ZeRO collectives run
        once per forward/backward, so ranks must do the same number)."""
        if not self.config.use_dynamic_bsz:
            return plan_fixed_size(len(lengths), self.config.micro_batch_size_per_gpu)
        count = 1
        while True:
            parts = plan_token_budget(
                lengths, budget, min_micro_batches=count, budget_key=budget_key
            )
            agreed = self.comm.max_int(len(parts))
            if agreed == count:  # every rank planned exactly `count` (never fewer than asked)
                return parts
            count = agreed

    def forward(
        self, packed: PackedRows, temperature: float, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token log-probs (and entropy) of ``softmax(logits / temperature)``."""
        packed = packed.to(self.engine.device)
        return token_log_probs(
            self.engine.logits(packed),
            packed.targets,
            temperature=temperature,
            chunk_size=self.config.logits_chunk_size,
            with_entropy=with_entropy,
        )

    def forward_rows(
        self, packed: PackedRows, temperature: float, width: int, *, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, SequenceShards | None]:
        """Log-probs [n, width] of the packed rows (entropy too if asked), and this rank's
        sequence shards (None without sequence parallel).

        Under sequence parallel the log-probs are this rank's tokens only (0 elsewhere,
        differentiable); with ``with_entropy`` (the no-grad log-prob pass) every rank gets
        every token's values instead, and no shards.
        """
        if self.comm.sp_size == 1:
            logp, ent = self.forward(packed, temperature, with_entropy)
            rows = unpack_to_rows(logp, packed.response_lengths, width)
            ent_rows = None if ent is None else unpack_to_rows(ent, packed.response_lengths, width)
            return rows, ent_rows, None
        shard = shard_packed(packed, self.comm.sp_size, self.comm.sp_rank)
        logp, ent = self.forward(shard.local, temperature, with_entropy)
        lengths = packed.response_lengths
        if with_entropy:
            both = self._concat_pieces(torch.stack([logp, ent]), shard.token_slices)
            return (
                unpack_to_rows(both[0], lengths, width),
                unpack_to_rows(both[1], lengths, width),
                None,
            )
        starts, ends = row_segments(lengths, shard.token_slices)
        shards = SequenceShards(
            shard.rank, starts.to(logp.device), ends.to(logp.device), self.comm.sp_all_gather
        )
        return unpack_to_rows(shard.place(logp), lengths, width), None, shards

    def _concat_pieces(self, values: torch.Tensor, slices: list[tuple[int, int]]) -> torch.Tensor:
        """[m, K_local] of every rank of the group -> [m, K] in packed order (no grad)."""
        longest = max(hi - lo for lo, hi in slices)
        padded = torch.nn.functional.pad(values, (0, longest - values.shape[1]))
        parts = self.comm.sp_all_gather(padded)
        return torch.cat([parts[r, :, : hi - lo] for r, (lo, hi) in enumerate(slices)], dim=1)

    def lr_for_step(self, global_step: int) -> float | None:
        """The LR of training step ``global_step`` (``lr_warmup_unit=train_step``), else None
        (the engine's per-optimizer-step schedule decides)."""
        cfg = self.config
        if cfg.lr_warmup_unit != "train_step":
            return None
        return cfg.lr * train_step_warmup_factor(global_step, cfg.lr_warmup_steps)

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def compute_log_prob(
        self,
        batch: Batch,
        *,
        mini_batch_rows: int,
        temperature: float,
        max_token_len: int | None = None,
    ) -> Batch:
        """``old_log_probs`` and ``entropy`` [n, R] of this rank's rows, at ``temperature``.

        Micro-batches are planned exactly as ``update`` plans them (same budget unless
        ``log_prob_max_token_len_per_gpu`` or ``max_token_len`` says otherwise), so on-policy
        ratios are exactly 1. Entropy comes from the same logits (no extra forward), as the
        reference logs it.
        """
        require_fields(batch, LOG_PROB_INPUTS, "compute_log_prob")
        input_ids, attn = batch["input_ids"], batch["attention_mask"]
        width = batch["responses"].shape[1]
        prompt_width = input_ids.shape[1] - width
        lengths = attn.sum(-1).tolist()
        self.engine.train()  # same mode as the update (dropout is disabled at load)
        out = torch.zeros(len(batch), width, dtype=torch.float32)
        ent_out = torch.zeros(len(batch), width, dtype=torch.float32)
        for rows in mini_batch_ranges(len(batch), mini_batch_rows):
            plan = self.plan(
                [lengths[i] for i in rows],
                (max_token_len or self.config.log_prob_token_budget) * self.comm.sp_size,
                _budget_key("actor.log_prob_max_token_len_per_gpu", self.comm.sp_size),
            )
            for part in plan:
                idx = torch.tensor([rows[i] for i in part], dtype=torch.long)
                packed = pack_rows(input_ids[idx], attn[idx], prompt_width)
                logp, ent, _ = self.forward_rows(packed, temperature, width, with_entropy=True)
                out[idx] = logp.cpu()
                ent_out[idx] = ent.cpu()
        return Batch({"old_log_probs": out, "entropy": ent_out})

    # ------------------------------------------------------------------ update
    def update(
        self,
        batch: Batch,
        *,
        mini_batch_rows: int,
        temperature: float,
        global_step: int,
        max_token_len: int | None = None,
        record_rows: Sequence[int] = (),
    ) -> dict[str, float]:
        """One optimizer step per mini-batch (x ``ppo_epochs``); metrics identical on all ranks.

        ``global_step`` is the 1-based training step being run (it sets the LR when
        ``lr_warmup_unit=train_step``); ``max_token_len`` overrides
        ``actor.ppo_max_token_len_per_gpu`` for this call. The loss's per-token values of
        the local rows ``record_rows`` end in ``self.token_records`` (``TokenRecorder``).
        """
        require_fields(batch, UPDATE_INPUTS, "update_policy")
        cfg = self.config
        t_start = time.perf_counter()
        reference = cfg.loss_scale == "reference"
        mode = cfg.policy_loss.loss_agg_mode
        norm_len = cfg.policy_loss.loss_norm_length
        input_ids, attn = batch["input_ids"], batch["attention_mask"]
        width = batch["responses"].shape[1]
        prompt_width = input_ids.shape[1] - width
        resp_mask = batch["response_mask"].float()
        old_lp = batch["old_log_probs"].float()
        adv = batch["advantages"].float()
        is_w = batch["rollout_is_weights"].float() if "rollout_is_weights" in batch else None
        lengths = attn.sum(-1).tolist()
        step_lr = self.lr_for_step(global_step)
        device = self.engine.device

        micro_records: list[tuple[int, dict[str, float], float]] = []  # (step, metrics, weight)
        step_records: list[dict[str, float]] = []
        comm, sp = self.comm, self.comm.sp_size
        recorder = TokenRecorder(record_rows)
        self.engine.train()
        step = 0
        for epoch in range(cfg.ppo_epochs):
            for mb_index, rows in enumerate(mini_batch_ranges(len(batch), mini_batch_rows)):
                plan = self.plan(
                    [lengths[i] for i in rows],
                    (max_token_len or cfg.ppo_max_token_len_per_gpu) * sp,
                    _budget_key("actor.ppo_max_token_len_per_gpu", sp),
                )
                if step_lr is not None:
                    self.engine.set_lr(step_lr)
                lr = self.engine.get_lr()
                mb_rows = torch.tensor(list(rows), dtype=torch.long)
                d_est = 0.0
                if not reference:
                    (d_est,) = comm.sum(
                        comm.once_per_group([local_denominator(resp_mask[mb_rows], mode, norm_len)])
                    )
                scale = d_est / comm.world_size  # global: loss = numerator / (D / W)
                numerator = d_local = 0.0
                tokens = resp_tokens = 0
                drift = 0.0
                for i, part in enumerate(plan):
                    idx = torch.tensor([rows[j] for j in part], dtype=torch.long)
                    packed = pack_rows(input_ids[idx], attn[idx], prompt_width)
                    self.engine.set_accumulation_boundary(i == len(plan) - 1)
                    logp, _, shards = self.forward_rows(
                        packed, temperature, width, with_entropy=False
                    )
                    mask = resp_mask[idx].to(device)
                    own_mask = mask if shards is None else mask * shards.owned(width)
                    old = old_lp[idx].to(device)
                    terms = compute_policy_terms(
                        cfg.loss_name,
                        old,
                        logp,
                        adv[idx].to(device),
                        own_mask,
                        cfg.policy_loss,
                        shards,
                        None if is_w is None else is_w[idx],  # rollout correction
                    )
                    recorder.observe(idx, step, terms.token_stats, mask, shards)
                    # Each row's loss tokens over all shards (None: this rank holds them all).
                    row_counts = None if shards is None else shards.sum(terms.loss_mask.sum(-1))
                    m = with_empty_subset_zeros(terms.metrics) if reference else terms.metrics
                    micro = {f"actor/{k}": v for k, v in m.items()}
                    if reference:
                        micro_loss = aggregate_loss(
                            terms.loss_mat,
                            terms.loss_mask,
                            mode,
                            norm_length=norm_len,
                            row_counts=row_counts,
                        )
                        factor = len(part) / len(rows) if cfg.use_dynamic_bsz else 1 / len(plan)
                        loss = micro_loss * (factor * sp)
                        value = micro_loss.detach()
                        if shards is not None:
                            value = shards.sum(value)
                        micro["actor/pg_loss"] = float(value)
                    else:
                        loss = aggregate_loss(
                            terms.loss_mat,
                            terms.loss_mask,
                            mode,
                            global_denominator=scale,
                            norm_length=norm_len,
                            row_counts=row_counts,
                        )
                        numerator += float(loss.detach()) * (scale if scale > 0 else 1.0)
                        d_local += local_denominator(terms.loss_mask, mode, norm_len, row_counts)
                    self.engine.backward(loss)
                    weight = float(mask.sum())
                    tokens += packed.num_tokens
                    resp_tokens += int(weight)
                    if epoch == 0 and mb_index == 0 and weight > 0:
                        gap = (logp.detach() - old).abs() * own_mask
                        drift = max(drift, float(gap.max()))
                    parts = token_weighted_parts(micro, adv[idx], mask)  # subsets: own tokens
                    micro_records += [(step, m, 1.0 if reference else w) for m, w in parts]
                num_total, d_true, tok_total, resp_total = comm.sum(
                    [numerator, *comm.once_per_group([d_local, float(tokens), float(resp_tokens)])]
                )
                grad_scale = d_est / d_true if not reference and d_true > 0 else 1.0
                grad_norm = self.engine.step(grad_scale)
                self.weights_version += 1
                record = {
                    "actor/grad_norm": grad_norm,
                    "actor/lr": lr,
                    "actor/micro_batches_per_rank": float(len(plan)),
                    "_tokens": tok_total,
                    "_response_tokens": resp_total,
                }
                if not reference:
                    record["actor/pg_loss"] = num_total / d_true if d_true > 0 else 0.0
                    record["actor/loss_denominator"] = d_true
                if epoch == 0 and mb_index == 0:
                    (record["actor/on_policy_log_ratio_abs_max"],) = comm.max([drift])
                step_records.append(record)
                step += 1
        self.token_records = recorder.records()
        return self._finish_metrics(micro_records, step_records, time.perf_counter() - t_start)

    def _finish_metrics(
        self,
        micro_records: list[tuple[int, dict[str, float], float]],
        step_records: list[dict[str, float]],
        elapsed: float,
    ) -> dict[str, float]:
        """One value per metric for the whole update, identical on every rank.

        reference: every micro-batch value of every rank and mini-batch weighs the same (the
        plain mean verl 0.5 logs); global: token-weighted within a mini-batch (max/min where
        the name says so), then the mean over mini-batches.
        """
        gathered = self.comm.gather_objects(micro_records)
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in step_records]
        if self.config.loss_scale == "reference":
            out = mean_metrics([m for recs in gathered for (_, m, _) in recs])
            out.update(mean_metrics(public))
        else:
            per_step: list[dict[str, float]] = []
            for s, record in enumerate(public):
                parts = [(m, w) for recs in gathered for (st, m, w) in recs if st == s]
                merged = reduce_metrics([m for m, _ in parts], [w for _, w in parts])
                merged.update(record)
                per_step.append(merged)
            out = reduce_metrics(per_step)
        out["actor/lr"] = step_records[-1]["actor/lr"] if step_records else 0.0
        tokens = sum(r["_tokens"] for r in step_records)
        out["actor/tokens"] = tokens
        out["actor/response_tokens"] = sum(r["_response_tokens"] for r in step_records)
        out["actor/optimizer_steps"] = float(len(step_records))
        (slowest,) = self.comm.max([elapsed])
        out["actor/update_time_s"] = slowest
        out["actor/tokens_per_s"] = tokens / slowest if slowest > 0 else 0.0
        return out
