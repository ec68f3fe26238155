"""Driver-side handle of the actor: a WorkerGroup of DeepSpeed ranks + batch dispatch.

Why here and not in the trainer: how rows are dealt to ranks decides both speed (each
mini-batch's rows balanced by length across ranks) and exactness (``compute_log_prob`` and
``update_policy`` must see the same rows in the same micro-batches for on-policy ratios of
exactly 1), so both calls share ``plan_rows``.
"""

from __future__ import annotations

from typing import Any

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.worker import META_MINI_BATCH_ROWS, DeepSpeedActorWorker
from fipo_trainer.cluster.dispatch import dp_partition
from fipo_trainer.cluster.resource_pool import ResourcePool, RolePlacement
from fipo_trainer.cluster.worker_group import WorkerGroup
from fipo_trainer.data.batch import Batch

META_ROLLOUT_N = "rollout_n"


def responses_per_prompt(batch: Batch) -> int:
    """n: from ``meta["rollout_n"]``, else the (equal) sizes of the ``uid`` groups, else 1."""
    if META_ROLLOUT_N in batch.meta:
        return int(batch.meta[META_ROLLOUT_N])
    if "uid" in batch:
        sizes = {len(v) for v in batch.group_indices("uid").values()}
        if len(sizes) == 1:
            return sizes.pop()
        raise ValueError(
            f"uid groups have different sizes {sorted(sizes)}; set batch.meta['rollout_n'] or "
            "keep whole groups (n responses per prompt)"
        )
    return 1


def plan_rows(batch: Batch, config: ActorConfig, world_size: int) -> tuple[list[list[int]], int]:
    """(rows per rank, mini-batch rows per rank) for this batch (see module docstring)."""
    n = len(batch)
    rows = config.ppo_mini_batch_size * responses_per_prompt(batch)
    if n <= rows:
        rows = n
    elif n % rows:
        raise ValueError(
            f"the batch has {n} rows, not a multiple of a mini-batch of {rows} rows "
            f"(actor.ppo_mini_batch_size={config.ppo_mini_batch_size} prompts x "
            f"{rows // config.ppo_mini_batch_size} responses); make data.train_batch_size a "
            "multiple of actor.ppo_mini_batch_size"
        )
    if rows % world_size:
        raise ValueError(
            f"a mini-batch of {rows} rows cannot be split evenly across {world_size} actor "
            "ranks; choose actor.ppo_mini_batch_size x rollout.n divisible by the actor world size"
        )
    lengths = batch["attention_mask"].sum(-1).tolist()
    return dp_partition(lengths, world_size, rows), rows // world_size


class ActorGroup:
    """The actor role: ``world_size`` DeepSpeed ranks behind one object."""

    def __init__(
        self,
        config: ActorConfig | dict[str, Any],
        world_size: int,
        *,
        pool: ResourcePool | RolePlacement | None = None,
        name: str = "actor",
        num_cpus_per_worker: float | None = None,
        num_gpus_per_worker: float | None = None,
        startup_timeout_s: float = 900.0,
    ) -> None:
        self.config = ActorConfig.coerce(config)
        self.workers = WorkerGroup(
            DeepSpeedActorWorker,
            world_size,
            init_kwargs={"config": self.config},
            pool=pool,
            name=name,
            num_cpus_per_worker=num_cpus_per_worker,
            num_gpus_per_worker=num_gpus_per_worker,
            startup_timeout_s=startup_timeout_s,
        )

    @property
    def world_size(self) -> int:
        return self.workers.world_size

    def _dispatch(self, method: str, batch: Batch) -> Any:
        partitions, local_rows = plan_rows(batch, self.config, self.world_size)
        shard_input = Batch(
            batch.tensors, batch.non_tensors, {**batch.meta, META_MINI_BATCH_ROWS: local_rows}
        )
        return self.workers.dispatch_dp(method, shard_input, partitions=partitions)

    def compute_log_prob(self, batch: Batch) -> Batch:
        """``old_log_probs`` (+ ``entropy``) for every row, in the batch's row order."""
        return self._dispatch("compute_log_prob", batch)

    def update_policy(self, batch: Batch) -> dict[str, float]:
        """Run the PPO update on the batch; returns metrics (identical on all ranks)."""
        return self._dispatch("update_policy", batch)[0]

    def save_checkpoint(self, path: str) -> str:
        return self.workers.execute_all("save_checkpoint", str(path))[0]

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        return self.workers.execute_all("load_checkpoint", str(path))[0]

    def export_hf(self, path: str) -> str:
        return self.workers.execute_all("export_hf", str(path))[0]

    def full_state_dict(self) -> dict[str, Any]:
        """Full weights (CPU tensors, HF names) through Ray: for tests and small models."""
        return self.workers.execute_all("full_state_dict")[0]

    def shutdown(self) -> None:
        self.workers.shutdown()
