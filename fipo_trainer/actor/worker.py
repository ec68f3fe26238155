"""The DeepSpeed actor worker (one Ray actor per data-parallel rank): a thin adapter.

It joins the process group, builds the engine (``actor.engine.DeepSpeedEngine``) and the
Ray-free update (``actor.policy_trainer.PolicyTrainer``), and exposes them, the weight
stream (``actor.weight_stream``), weight sync and checkpoints as Ray methods. No
algorithm lives here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fipo_trainer.actor.checkpoint import (
    DS_TAG,
    commit,
    prepare_tmp,
    read_marker,
    tmp_dir_for,
    write_marker,
)
from fipo_trainer.actor.comm import Collectives
from fipo_trainer.actor.config import ActorConfig
from fipo_trainer.actor.engine import DeepSpeedEngine, load_hf_config
from fipo_trainer.actor.policy_trainer import PolicyTrainer
from fipo_trainer.actor.shared_weights_source import SharedWeightsSourceMixin
from fipo_trainer.actor.weight_stream import (
    DEFAULT_BUCKET_BYTES,
    drain,
    full_state_dict,
    stream_full_weights,
)
from fipo_trainer.cluster.weight_sync import WeightSender
from fipo_trainer.cluster.worker import Worker, init_torch_distributed
from fipo_trainer.data.batch import Batch
from fipo_trainer.platform import current_platform
from fipo_trainer.plugins import import_plugins

logger = logging.getLogger(__name__)

SYNC_BUCKET_BYTES = DEFAULT_BUCKET_BYTES


class DeepSpeedActorWorker(Worker, WeightSender, SharedWeightsSourceMixin):
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
        self.platform.bind_device(self.dist_info.local_rank)
        self.platform.yield_cpu_to_rollout()
        torch.manual_seed(self.config.seed)
        init_torch_distributed(
            self.dist_info, self.platform.dist_backend, self.config.dist_timeout_s
        )
        sp = self.config.ulysses_sequence_parallel_size
        device = self.platform.device(self.dist_info.local_rank)
        self.comm = Collectives(self.world_size, device, sp_size=sp)
        if sp > 1:
            from fipo_trainer.actor import ulysses

            hf = load_hf_config(self.config)
            ulysses.check_heads(hf.num_attention_heads, hf.num_key_value_heads, sp)
            ulysses.set_group(self.comm.sp_group, sp, self.comm.sp_rank)
        self.engine = DeepSpeedEngine(self.config, self.world_size, self.platform)
        self.device = self.engine.device
        self.trainer = PolicyTrainer(self.config, self.engine, self.comm)

    @property
    def module(self) -> torch.nn.Module:
        """The Hugging Face model inside the engine."""
        return self.engine.module

    @property
    def weights_version(self) -> int:
        return self.trainer.weights_version

    # ------------------------------------------------------------------ algorithm
    def compute_log_prob(
        self,
        batch: Batch,
        *,
        mini_batch_rows: int,
        temperature: float,
        max_token_len: int | None = None,
    ) -> Batch:
        """``old_log_probs`` and ``entropy`` of this rank's rows (``PolicyTrainer``)."""
        return self.trainer.compute_log_prob(
            batch,
            mini_batch_rows=mini_batch_rows,
            temperature=temperature,
            max_token_len=max_token_len,
        )

    def update_policy(
        self,
        batch: Batch,
        *,
        mini_batch_rows: int,
        temperature: float,
        global_step: int,
        max_token_len: int | None = None,
        record_rows: Sequence[Sequence[int]] = (),
    ) -> dict[str, float]:
        """The PPO update of training step ``global_step`` on this rank's rows.

        ``record_rows[g]``: the local rows of data-parallel group ``g`` whose per-token loss
        values to keep for :meth:`token_records` (empty: none)."""
        group = self.rank // self.config.ulysses_sequence_parallel_size
        return self.trainer.update(
            batch,
            mini_batch_rows=mini_batch_rows,
            temperature=temperature,
            global_step=global_step,
            max_token_len=max_token_len,
            record_rows=record_rows[group] if record_rows else (),
        )

    def token_records(self) -> dict[int, dict[str, Any]]:
        """The per-token values the last update recorded, by local row."""
        return self.trainer.token_records

    # ------------------------------------------------------------------ weights
    def state_dict_for_sync(
        self, bucket_bytes: int = SYNC_BUCKET_BYTES
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named weights on rank 0; every rank must exhaust it (ZeRO-3 gathers)."""
        return stream_full_weights(self.engine, self.rank, bucket_bytes)

    def full_state_dict(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """Full CPU state dict (HF names) on rank 0 (or on all ranks: for cross-rank checks)."""
        return full_state_dict(self.engine, self.rank, all_ranks)

    # ------------------------------------------------------------------ weight sync
    # (protocol in fipo_trainer.cluster.weight_sync)
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
        from fipo_trainer.cluster.weight_transport import WeightSyncSender

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
            drain(stream)
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
        self.comm.barrier()
        self.engine.save(str(tmp), DS_TAG, {"weights_version": self.weights_version})
        self.comm.barrier()
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
        self.comm.barrier()
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
        client = self.engine.load(str(Path(path).expanduser().resolve()), DS_TAG)
        if client is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {path}/{DS_TAG}")
        self.trainer.weights_version = int(client.get("weights_version", info["weights_version"]))
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
        self.comm.barrier()
        return str(final)


def _copy_tokenizer(source: str, target: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer copied into %s (%s)", target, err)
        return
    tok.save_pretrained(target)
