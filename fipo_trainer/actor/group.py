"""The actor role on the driver: ``ActorGroup.compute_log_prob / update / save / load / export``.

Why rows are planned here and not in the trainer: how rows are dealt to ranks decides both
speed (each mini-batch's rows balanced by length across ranks) and exactness
(``compute_log_prob`` and ``update`` must see the same rows in the same micro-batches for
on-policy ratios of exactly 1), so both calls share ``plan_rows``. Each rank receives only
the fields it reads (``data/schema.py``: ``ACTOR_LOG_PROB_READS``, ``ACTOR_UPDATE_READS``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.worker import DeepSpeedActorWorker
from fipo_trainer.cluster.dispatch import dp_partition
from fipo_trainer.cluster.resource_pool import ResourcePool, RolePlacement
from fipo_trainer.cluster.worker_group import WorkerGroup
from fipo_trainer.cpu_ops import pending_build_message
from fipo_trainer.data.batch import Batch
from fipo_trainer.data.schema import (
    ACTOR_LOG_PROB_READS,
    ACTOR_UPDATE_OPTIONAL_READS,
    ACTOR_UPDATE_READS,
)

logger = logging.getLogger(__name__)


def responses_per_prompt(batch: Batch, n: int | None = None) -> int:
    """n: as given, else the (equal) sizes of the ``uid`` groups, else 1."""
    if n is not None:
        return int(n)
    if "uid" in batch:
        sizes = {len(v) for v in batch.group_indices("uid").values()}
        if len(sizes) == 1:
            return sizes.pop()
        raise ValueError(
            f"uid groups have different sizes {sorted(sizes)}; pass rollout_n to ActorGroup "
            "or keep whole groups (n responses per prompt)"
        )
    return 1


def plan_rows(
    batch: Batch, config: ActorConfig, world_size: int, n: int | None = None
) -> tuple[list[list[int]], int]:
    """(rows per data-parallel group, mini-batch rows per group) for this batch (see the
    module docstring); ``world_size`` counts data-parallel groups (ranks / SP size)."""
    rows_total = len(batch)
    rows = config.ppo_mini_batch_size * responses_per_prompt(batch, n)
    if rows_total <= rows:
        rows = rows_total
    elif rows_total % rows:
        raise ValueError(
            f"the batch has {rows_total} rows, not a multiple of a mini-batch of {rows} rows "
            f"(actor.ppo_mini_batch_size={config.ppo_mini_batch_size} prompts x "
            f"{rows // config.ppo_mini_batch_size} responses); make data.train_batch_size a "
            "multiple of actor.ppo_mini_batch_size"
        )
    if rows % world_size:
        raise ValueError(
            f"a mini-batch of {rows} rows cannot be split evenly across {world_size} "
            "data-parallel groups; choose actor.ppo_mini_batch_size x rollout.n divisible by the "
            "actor world size / actor.ulysses_sequence_parallel_size"
        )
    lengths = batch["attention_mask"].sum(-1).tolist()
    return dp_partition(lengths, world_size, rows), rows // world_size


class ActorGroup:
    """The actor role: ``world_size`` DeepSpeed ranks behind one object.

    ``rollout_n`` (responses per prompt) sizes the mini-batches in rows; without it, the
    ``uid`` groups of each batch tell. ``wait=False``: start the ranks, :meth:`wait_ready` later.
    """

    def __init__(
        self,
        config: ActorConfig | dict[str, Any],
        world_size: int,
        *,
        rollout_n: int | None = None,
        pool: ResourcePool | RolePlacement | None = None,
        name: str = "actor",
        num_cpus_per_worker: float | None = None,
        num_gpus_per_worker: float | None = None,
        startup_timeout_s: float = 900.0,
        wait: bool = True,
    ) -> None:
        self.config = ActorConfig.coerce(config)
        sp = self.config.ulysses_sequence_parallel_size
        if world_size % sp:
            raise ValueError(
                f"actor.ulysses_sequence_parallel_size={sp} does not divide the {world_size} "
                "actor ranks (resources.actor_world_size)"
            )
        self.rollout_n = rollout_n
        self.token_records: dict[int, dict[str, Any]] = {}  # of the last update's record_rows
        if (pending := pending_build_message()) is not None:
            logger.info(pending)  # else the start-up's wait is a silent half minute or more
        self._workers = WorkerGroup(
            DeepSpeedActorWorker,
            world_size,
            init_kwargs={"config": self.config},
            pool=pool,
            name=name,
            num_cpus_per_worker=num_cpus_per_worker,
            num_gpus_per_worker=num_gpus_per_worker,
            startup_timeout_s=startup_timeout_s,
            wait=wait,
        )

    def wait_ready(self) -> None:
        """Wait for the ranks of a group built with ``wait=False`` (idempotent): the trainer
        starts the ranks and the rollout engines together and waits once."""
        self._workers.wait_ready()

    @property
    def worker_group(self) -> WorkerGroup:
        """The ranks, for cluster plumbing (``cluster.weight_sync.WeightSync``) only."""
        return self._workers

    @property
    def world_size(self) -> int:
        return self._workers.world_size

    @property
    def dp_size(self) -> int:
        """Data-parallel groups: ranks / ``actor.ulysses_sequence_parallel_size``."""
        return self.world_size // self.config.ulysses_sequence_parallel_size

    def _dispatch(
        self,
        fn,
        batch: Batch,
        fields: tuple[str, ...],
        plan: tuple[list[list[int]], int] | None = None,
        **kwargs: Any,
    ) -> Any:
        partitions, local_rows = plan or plan_rows(batch, self.config, self.dp_size, self.rollout_n)
        return self._workers.dispatch_dp(
            fn,
            batch.select(*fields, meta=False),
            partitions=partitions,
            replicas=self.config.ulysses_sequence_parallel_size,
            mini_batch_rows=local_rows,
            **kwargs,
        )

    def compute_log_prob(
        self, batch: Batch, *, temperature: float, max_token_len: int | None = None
    ) -> Batch:
        """``old_log_probs`` and ``entropy`` for every row (logits / ``temperature``), in the
        batch's row order. ``max_token_len`` overrides the configured token budget."""
        return self._dispatch(
            DeepSpeedActorWorker.compute_log_prob,
            batch,
            ACTOR_LOG_PROB_READS,
            temperature=float(temperature),
            max_token_len=max_token_len,
        )

    def update(
        self,
        batch: Batch,
        *,
        temperature: float,
        global_step: int,
        max_token_len: int | None = None,
        record_rows: Sequence[int] = (),
    ) -> dict[str, float]:
        """The PPO update of training step ``global_step`` (1-based); metrics (identical on
        all ranks). ``max_token_len`` overrides the configured token budget.

        ``record_rows`` (batch rows): their per-token loss values, from the last mini-batch
        that saw each, land in ``self.token_records`` by batch row (see
        ``actor/token_record.py``); {} when none are asked for."""
        plan = plan_rows(batch, self.config, self.dp_size, self.rollout_n)
        wanted = {int(r) for r in record_rows}
        local = [[j for j, row in enumerate(part) if row in wanted] for part in plan[0]]
        metrics = self._dispatch(
            DeepSpeedActorWorker.update_policy,
            batch,
            (*ACTOR_UPDATE_READS, *(k for k in ACTOR_UPDATE_OPTIONAL_READS if k in batch)),
            plan,
            temperature=float(temperature),
            global_step=int(global_step),
            max_token_len=max_token_len,
            record_rows=local if wanted else (),
        )[0]
        self.token_records = {}
        if wanted:  # each data-parallel group's first rank holds its rows' whole records
            sp = self.config.ulysses_sequence_parallel_size
            per_rank = self._workers.call_all(DeepSpeedActorWorker.token_records)
            for part, records in zip(plan[0], per_rank[::sp]):
                self.token_records.update({int(part[j]): r for j, r in records.items()})
        return metrics

    def save(self, path: str) -> str:
        return self._workers.call_all(DeepSpeedActorWorker.save_checkpoint, str(path))[0]

    def load(self, path: str) -> dict[str, Any]:
        return self._workers.call_all(DeepSpeedActorWorker.load_checkpoint, str(path))[0]

    def export(self, path: str) -> str:
        """A Hugging Face model directory (+ tokenizer) of the current weights."""
        return self._workers.call_all(DeepSpeedActorWorker.export_hf, str(path))[0]

    def full_state_dict(self) -> dict[str, Any]:
        """Full weights (CPU tensors, HF names) through Ray: for tests and small models."""
        return self._workers.call_all(DeepSpeedActorWorker.full_state_dict)[0]

    def shutdown(self) -> None:
        self._workers.shutdown()
