"""Rollout worker: a Ray actor (via ``WorkerGroup``) that owns one rollout engine.

A thin adapter: prompt ``Batch`` in -> engine -> per-response ``Batch`` out (layout in
``rollout.assemble``), plus the receiving end of the weight sync. Everything engine
specific stays in the engine modules.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fipo_trainer.cluster.weight_sync import WeightSyncReceiver
from fipo_trainer.cluster.worker import Worker
from fipo_trainer.data.batch import Batch
from fipo_trainer.rollout.assemble import build_rollout_batch, prompt_token_lists
from fipo_trainer.rollout.config import RolloutConfig, SamplingConfig, ValSamplingConfig
from fipo_trainer.rollout.factory import build_engine

logger = logging.getLogger(__name__)


def rollout_config_from(value: RolloutConfig | dict[str, Any]) -> RolloutConfig:
    """Accept a dataclass or a plain dict (e.g. ``OmegaConf.to_container`` output)."""
    if isinstance(value, RolloutConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(
            f"rollout config must be a RolloutConfig or dict, got {type(value).__name__}"
        )
    known = {f.name for f in dataclasses.fields(RolloutConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown rollout config keys {unknown}; valid keys: {sorted(known)}")
    data = dict(value)
    if isinstance(data.get("val"), dict):
        data["val"] = ValSamplingConfig(**data["val"])
    return RolloutConfig(**data)


class RolloutWorker(Worker):
    """One engine per actor; on GPU it is given ``tensor_parallel_size`` GPUs by its group."""

    def __init__(self, model_path: str | Path, config: RolloutConfig | dict[str, Any]):
        super().__init__()
        from transformers import AutoTokenizer

        self.config = rollout_config_from(config)
        self.config.validate()
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {self.model_path} has no pad token; set pad_token")
        self.engine = build_engine(self.model_path, self.config)
        self._receiver: WeightSyncReceiver | None = None
        self.weights_version = 0

    # --- generation -----------------------------------------------------------------
    def generate_batch(
        self,
        batch: Batch,
        sampling: SamplingConfig | None = None,
        *,
        validate: bool = False,
        prompt_width: int | None = None,
    ) -> Batch:
        """n responses per prompt row, consecutive, each carrying its prompt's ``uid``.

        ``sampling=None`` uses the config's training block (``validate=True``: the ``val``
        block). ``prompt_width`` left-pads prompts to a common width (default: the input's
        padded width, or the longest prompt). Metrics are in ``meta["rollout_metrics"]``.
        """
        if sampling is None:
            sampling = self.config.val_sampling() if validate else self.config.sampling()
        prompts, _ = prompt_token_lists(batch)
        start = time.perf_counter()
        outputs = self.engine.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        texts = self.tokenizer.batch_decode(
            [list(o.token_ids) for o in outputs], skip_special_tokens=True
        )
        out = build_rollout_batch(
            batch,
            outputs,
            n=sampling.n,
            pad_token_id=self.tokenizer.pad_token_id,
            response_length=sampling.max_tokens,
            response_text=texts,
            seconds=seconds,
            prompt_width=prompt_width,
        )
        out.meta["weights_version"] = self.weights_version
        return out

    # --- weights --------------------------------------------------------------------
    def update_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Load tensors handed over directly (colocated / through the Ray object store)."""
        start = time.perf_counter()
        self.engine.wake()
        count = self.engine.update_weights(named_tensors)
        self.weights_version += 1
        return {"sync/load_seconds": time.perf_counter() - start, "sync/tensors": float(count)}

    def init_weight_sync(
        self,
        host: str,
        port: int,
        world_size: int,
        rank: int | None = None,
        *,
        timeout_s: float = 300.0,
        group_name: str = "default",
    ) -> int:
        """Join the sync group (blocks until actor rank 0 and every rollout worker joined).

        ``rank`` defaults to 1 + this worker's rank in its group. Returns the rank used.
        """
        rank = 1 + self.rank if rank is None else rank
        if self._receiver is not None:
            self._receiver.close()
        self._receiver = WeightSyncReceiver(
            host, port, world_size, rank, timeout_s=timeout_s, group_name=group_name
        )
        return rank

    def receive_weights(self) -> dict[str, float]:
        """Receive one broadcast from actor rank 0 and load it into the engine."""
        if self._receiver is None:
            raise RuntimeError(
                "receive_weights() before init_weight_sync(); join the sync group first"
            )
        start = time.perf_counter()
        self.engine.wake()
        stream = self._receiver.receive()
        try:
            count = self.engine.update_weights(stream)
        finally:
            # Drain whatever the engine did not consume, so the sender never blocks.
            leftover = sum(1 for _ in stream)
        if leftover:
            raise RuntimeError(
                f"the rollout engine stopped after {count} tensors; {leftover} were not loaded"
            )
        self.weights_version += 1
        stats = self._receiver.last_stats
        return {
            **stats.metrics(),
            "sync/seconds": time.perf_counter() - start,
            "sync/loaded_tensors": float(count),
        }

    # --- memory / lifecycle -----------------------------------------------------------
    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def shutdown(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        self.engine.shutdown()


def generate_on_workers(
    group, batch: Batch, sampling: SamplingConfig | None = None, *, validate: bool = False
) -> Batch:
    """Split prompt rows across a ``WorkerGroup`` of ``RolloutWorker`` and join the results.

    (``WorkerGroup.dispatch_dp`` assumes a method returns one row per input row; generation
    returns n.) Shards are consecutive so the output keeps prompt order; metrics are merged:
    token counts add up, seconds is the slowest worker.
    """
    if len(batch) == 0:
        raise ValueError("generate_on_workers got an empty prompt batch")
    prompts, width = prompt_token_lists(batch)
    width = width or max(len(p) for p in prompts)  # one prompt width for every shard
    shards = batch.chunk(min(group.world_size, len(batch)))
    refs = [
        group.actors[r].generate_batch.remote(
            shard, sampling, validate=validate, prompt_width=width
        )
        for r, shard in enumerate(shards)
    ]
    results: list[Batch] = group.get(refs, "generate_batch")
    per_worker = [r.meta.pop("rollout_metrics") for r in results]
    out = Batch.concat(results)
    seconds = max(m["rollout/seconds"] for m in per_worker)
    tokens = sum(m["rollout/response_tokens"] for m in per_worker)
    responses = sum(m["rollout/responses"] for m in per_worker)
    mask = out["response_mask"]
    out.meta["rollout_metrics"] = {
        "rollout/seconds": seconds,
        "rollout/responses": responses,
        "rollout/response_tokens": tokens,
        "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "rollout/response_length_mean": float(mask.sum(1).mean()),
        "rollout/response_length_max": float(mask.sum(1).max()),
        "rollout/truncated_frac": float((out["finish_reason"] == "length").mean()),
    }
    return out
