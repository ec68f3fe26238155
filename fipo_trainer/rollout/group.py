"""The rollout role on the driver: ``RolloutGroup.generate / sleep / wake / shutdown``.

Why generation is not ``WorkerGroup.dispatch_dp``: a worker returns n rows per prompt row.
Prompt rows are cut into consecutive shards (one per worker), so the joined output keeps
prompt order; only the prompt token ids travel to the workers, and the prompt's own fields
(uid, ground truth, ...) are repeated n times here on the driver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fipo_trainer.cluster.resource_pool import ResourcePool, RolePlacement
from fipo_trainer.cluster.worker_group import WorkerGroup
from fipo_trainer.data.batch import Batch
from fipo_trainer.rollout.assemble import expand_prompt_fields, generate_inputs, prompt_token_lists
from fipo_trainer.rollout.config import RolloutConfig, SamplingConfig
from fipo_trainer.rollout.worker import RolloutWorker


def merge_rollout_metrics(per_worker: Sequence[dict[str, float]]) -> dict[str, float]:
    """One generate call over several workers: counts add up, seconds is the slowest."""
    seconds = max(m["rollout/seconds"] for m in per_worker)
    tokens = sum(m["rollout/response_tokens"] for m in per_worker)
    return {
        "rollout/seconds": seconds,
        "rollout/responses": sum(m["rollout/responses"] for m in per_worker),
        "rollout/response_tokens": tokens,
        "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }


class RolloutGroup:
    """``world_size`` rollout workers (one engine each) behind one object."""

    def __init__(
        self,
        model_path: str | Path,
        config: RolloutConfig | dict[str, Any],
        world_size: int,
        *,
        pool: ResourcePool | RolePlacement | None = None,
        name: str = "rollout",
        num_cpus_per_worker: float | None = None,
        num_gpus_per_worker: float | None = None,
        startup_timeout_s: float = 600.0,
    ) -> None:
        self._workers = WorkerGroup(
            RolloutWorker,
            world_size,
            init_kwargs={"model_path": str(model_path), "config": config},
            pool=pool,
            name=name,
            num_cpus_per_worker=num_cpus_per_worker,
            num_gpus_per_worker=num_gpus_per_worker,
            startup_timeout_s=startup_timeout_s,
        )

    @property
    def worker_group(self) -> WorkerGroup:
        """The workers, for cluster plumbing (``cluster.weight_sync.WeightSync``) only."""
        return self._workers

    @property
    def world_size(self) -> int:
        return self._workers.world_size

    def generate(
        self, prompts: Batch, sampling: SamplingConfig | None = None, *, validate: bool = False
    ) -> tuple[Batch, dict[str, float]]:
        """n responses per prompt row (consecutive, in prompt order) and ``rollout/*`` metrics.

        The batch holds the ``generate`` fields plus the prompt fields (``data/schema.py``).
        ``sampling=None``: the config's training block (``validate=True``: its val block).
        """
        if len(prompts) == 0:
            raise ValueError("RolloutGroup.generate got an empty prompt batch")
        token_lists, width = prompt_token_lists(prompts)
        width = width or max(len(p) for p in token_lists)  # one prompt width for every shard
        shards = generate_inputs(prompts).chunk(min(self.world_size, len(prompts)))
        results = self._workers.scatter(
            RolloutWorker.generate_batch,
            [(shard, sampling) for shard in shards],
            validate=validate,
            prompt_width=width,
        )
        out = Batch.concat([batch for batch, _ in results])
        n = len(out) // len(prompts)
        out |= expand_prompt_fields(prompts, n)
        return out, merge_rollout_metrics([m for _, m in results])

    def load_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[dict]:
        """Hand tensors to every engine directly (through the Ray object store)."""
        return self._workers.call_all(RolloutWorker.update_weights, list(named_tensors))

    def sleep(self) -> None:
        """Release the engines' memory (colocated: the actor needs it); the sync wakes them."""
        self._workers.call_all(RolloutWorker.sleep)

    def wake(self) -> None:
        self._workers.call_all(RolloutWorker.wake)

    def shutdown(self) -> None:
        """Stop the engines (best effort), then the worker processes."""
        with contextlib.suppress(Exception):
            self._workers.call_all(RolloutWorker.shutdown)
        self._workers.shutdown()
