"""The RL loop: generate → grade → dynamic sampling → old log-probs → advantages → update → sync.

The driver process owns the loop and only moves `Batch` objects between roles; every heavy
step runs in a worker (vLLM rollout, DeepSpeed actor, reward process pool). One step, as in
ARCHITECTURE.md:

1. the sampler yields `gen_batch_size` prompts; rollout workers generate `n` responses each;
2. the reward pool grades them (score, acc, pred; overlong shaping);
3. dynamic sampling keeps groups whose `acc` varies, and repeats 1–2 until
   `train_batch_size` groups or `max_num_gen_batches` rounds;
4. the actor recomputes old log-probs; the driver computes advantages (pure function);
5. the actor runs one optimizer step per mini-batch (FIPO by default);
6. the new weights are broadcast to the rollout engines;
7. validation every `test_freq`, a checkpoint every `save_freq`, metrics every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fipo_trainer.algorithms.advantages import compute_advantage
from fipo_trainer.data.batch import Batch
from fipo_trainer.trainer.config import TrainConfig

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss with nan_policy=stop, sampling exhausted)."""


@dataclass
class TrainResult:
    """What a finished run leaves behind (paths are inside the run directory)."""

    run_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    export_dir: Path | None = None
    plot: Path | None = None


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Accumulate wall-clock seconds of a stage into `timings['timing_s/<name>']`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        key = f"timing_s/{name}"
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def step_seed(base: int, step: int, round_: int) -> int:
    """A sampling seed that depends only on (run seed, step, generation round).

    Fresh samples every round, and a resumed run draws exactly what an uninterrupted one would.
    """
    return (base * 1_000_003 + step * 1_009 + round_ * 7_919) % (2**31 - 1)


# --------------------------------------------------------------------------- pure pieces


def attach_rewards(batch: Batch, result: Any) -> Batch:
    """Put per-response reward fields on a rollout batch (score as a token tensor too).

    `token_level_scores` carries the shaped score on the last response token, as verl does.
    """
    scores = torch.tensor(result.scores, dtype=torch.float32)
    mask = batch["response_mask"].float()
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    token_scores = torch.zeros_like(mask)
    token_scores[torch.arange(len(batch)), last] = scores
    batch.tensors["token_level_scores"] = token_scores
    batch.non_tensors["score"] = np.asarray(result.scores, dtype=object)
    batch.non_tensors["acc"] = np.asarray(result.acc, dtype=object)
    batch.non_tensors["pred"] = np.asarray(result.preds, dtype=object)
    return batch


def filter_groups(batch: Batch, metric: str) -> tuple[Batch, int, int]:
    """DAPO dynamic sampling: keep groups whose `metric` has non-zero std.

    Returns (kept rows, groups kept, groups seen). Groups stay whole and in order.
    """
    groups = batch.group_indices("uid")
    values = batch.non_tensors[metric]
    keep: list[int] = []
    kept = 0
    for rows in groups.values():
        vals = np.asarray([float(values[i]) for i in rows])
        if len(rows) > 1 and vals.std() > 0:
            keep.extend(rows)
            kept += 1
    return batch[np.asarray(keep, dtype=np.int64)], kept, len(groups)


def take_groups(batch: Batch, n_groups: int) -> Batch:
    """The first `n_groups` whole uid groups of a batch."""
    groups = list(batch.group_indices("uid").values())[:n_groups]
    rows = [i for g in groups for i in g]
    return batch[np.asarray(rows, dtype=np.int64)]


def concat_rollouts(batches: list[Batch], pad_token_id: int) -> Batch:
    """Join rollout batches of several generation rounds.

    Each round's prompts are left-padded to that round's longest prompt, so prompt-side
    tensors are left-padded to a common width (responses share `max_tokens` already).
    """
    pad = {
        "input_ids": (pad_token_id, "left"),
        "prompts": (pad_token_id, "left"),
        "attention_mask": (0, "left"),
        "position_ids": (0, "left"),
    }
    return Batch.concat(batches, pad={k: v for k, v in pad.items() if k in batches[0].tensors})


def finite_or_raise(metrics: dict[str, float], keys: tuple[str, ...]) -> list[str]:
    """Names of `keys` whose values are NaN/Inf."""
    return [k for k in keys if k in metrics and not math.isfinite(metrics[k])]


def response_metrics(batch: Batch, max_response_length: int) -> dict[str, float]:
    lengths = batch["response_mask"].float().sum(-1)
    prompt_lengths = batch["attention_mask"].float().sum(-1) - lengths
    return {
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": float((lengths >= max_response_length).float().mean()),
        "prompt_length/mean": float(prompt_lengths.mean()),
    }


def reward_metrics(batch: Batch, result_metrics: dict[str, float]) -> dict[str, float]:
    scores = np.asarray(batch.non_tensors["score"], dtype=np.float64)
    acc = np.asarray(batch.non_tensors["acc"], dtype=np.float64)
    out = {
        "reward/score_mean": float(scores.mean()),
        "reward/score_max": float(scores.max()),
        "reward/score_min": float(scores.min()),
        "reward/acc_mean": float(acc.mean()),
    }
    for key in ("reward/timeouts", "reward/errors"):
        out[key] = float(result_metrics.get(key, 0.0))
    return out


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- the trainer


class RLTrainer:
    """Builds the roles from a validated `TrainConfig` and runs the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        from fipo_trainer.trainer.config import validate_config

        validate_config(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.actor = None
        self.rollout = None
        self.reward_pool = None
        self.placements = None
        self._sync_ready = False

    # ----------------------------------------------------------------- set-up
    def _start_roles(self) -> None:
        from fipo_trainer.actor.group import ActorGroup
        from fipo_trainer.cluster.ray_init import init_ray
        from fipo_trainer.cluster.resource_pool import plan_placement
        from fipo_trainer.cluster.worker_group import WorkerGroup
        from fipo_trainer.rewards.pool import RewardPool
        from fipo_trainer.rollout.worker import RolloutWorker

        cfg = self.cfg
        res = cfg.resources
        init_ray(res.ray_address, res.ray_num_cpus)
        self.placements = plan_placement(
            res.placement,
            actor_world_size=res.actor_world_size,
            rollout_world_size=res.rollout_workers,
            rollout_gpus_per_worker=cfg.rollout.tensor_parallel_size,
            cpus_per_slot=None if res.gpus_per_node else res.cpus_per_actor_worker,
        )
        self.reward_pool = RewardPool(cfg.reward)
        self.actor = ActorGroup(
            cfg.actor.to_actor_config(), res.actor_world_size, pool=self.placements["actor"]
        )
        self.rollout = WorkerGroup(
            RolloutWorker,
            res.rollout_workers,
            init_kwargs={"model_path": cfg.model.path, "config": cfg.rollout},
            pool=self.placements["rollout"],
            name="rollout",
        )

    def sync_weights(self) -> dict[str, float]:
        """Actor → every rollout engine over the dedicated sync group, in buckets."""
        from fipo_trainer.cluster.weight_sync import connect_weight_sync, sync_weights

        if not self._sync_ready:
            connect_weight_sync(self.actor.workers, self.rollout)
            self._sync_ready = True
        return sync_weights(self.actor.workers, self.rollout)

    # ----------------------------------------------------------------- data
    def _build_data(self) -> None:
        from fipo_trainer.trainer.data_source import PromptSource

        self.prompts = PromptSource.for_split(self.cfg, "train")
        self.val_prompts = PromptSource.for_split(self.cfg, "val")

    # ----------------------------------------------------------------- one step
    def generate_and_grade(
        self, prompts: Batch, sampling, timings: dict[str, float]
    ) -> tuple[Batch, dict]:
        from fipo_trainer.rollout.worker import generate_on_workers

        with timed(timings, "gen"):
            rollout = generate_on_workers(self.rollout, prompts, sampling)
        with timed(timings, "reward"):
            lengths = rollout["response_mask"].sum(-1).tolist()
            result = self.reward_pool.grade(
                list(rollout.non_tensors["response_text"]),
                list(rollout.non_tensors["ground_truth"]),
                list(rollout.non_tensors["data_source"]),
                response_lengths=[int(x) for x in lengths],
                extra_infos=list(rollout.non_tensors["extra_info"])
                if "extra_info" in rollout.non_tensors
                else None,
            )
        attach_rewards(rollout, result)
        return rollout, {**rollout.meta.pop("rollout_metrics", {}), **result.metrics}

    def collect_batch(self, step: int, timings: dict[str, float]) -> tuple[Batch | None, dict]:
        """Generation rounds with dynamic sampling until `train_batch_size` groups."""
        cfg = self.cfg
        fg = cfg.algorithm.filter_groups
        n = cfg.rollout.n
        target = cfg.data.train_batch_size
        kept: list[Batch] = []
        kept_groups = generated_groups = rounds = 0
        all_rollouts: list[Batch] = []
        rollout_stats: list[dict] = []
        while True:
            rounds += 1
            prompts = self.prompts.next_batch(
                cfg.data.gen_batch_size, uid_prefix=f"s{step}r{rounds}"
            )
            sampling = dataclasses.replace(
                cfg.rollout.sampling(), seed=step_seed(cfg.trainer.seed, step, rounds)
            )
            rollout, stats = self.generate_and_grade(prompts, sampling, timings)
            rollout_stats.append(stats)
            all_rollouts.append(rollout)
            if fg.enable:
                rollout_kept, k, seen = filter_groups(rollout, fg.metric)
            else:
                rollout_kept, k, seen = rollout, len(rollout) // n, len(rollout) // n
            generated_groups += seen
            if k:
                kept.append(rollout_kept)
                kept_groups += k
            if not fg.enable or kept_groups >= target:
                break
            if fg.max_num_gen_batches > 0 and rounds >= fg.max_num_gen_batches:
                if fg.on_exhausted == "error":
                    raise TrainingStopped(
                        f"dynamic sampling kept {kept_groups}/{target} groups after {rounds} "
                        f"generation rounds (algorithm.filter_groups.max_num_gen_batches="
                        f"{fg.max_num_gen_batches}); the task is too easy or too hard for the "
                        "model. Raise max_num_gen_batches, or set "
                        "algorithm.filter_groups.on_exhausted=proceed to train on what was kept"
                    )
                break
            logger.info(
                "step %d: %d/%d groups kept after %d rounds", step, kept_groups, target, rounds
            )

        pad_id = self.prompts.dataset.tokenizer.pad_token_id
        everything = concat_rollouts(all_rollouts, pad_id)
        metrics = {
            "sampling/gen_rounds": float(rounds),
            "sampling/groups_generated": float(generated_groups),
            "sampling/groups_kept": float(kept_groups),
            "sampling/kept_frac": kept_groups / max(generated_groups, 1),
            "rollout/tokens_per_s": float(
                np.mean([s.get("rollout/tokens_per_s", 0.0) for s in rollout_stats])
            ),
            **reward_metrics(everything, rollout_stats[-1]),
            "reward/timeouts": float(sum(s.get("reward/timeouts", 0.0) for s in rollout_stats)),
            "reward/errors": float(sum(s.get("reward/errors", 0.0) for s in rollout_stats)),
            **response_metrics(everything, cfg.data.max_response_length),
        }
        self._last_rollouts = everything
        usable = min(kept_groups, target)
        mini = cfg.actor.ppo_mini_batch_size
        usable -= usable % mini  # whole mini-batches only
        if usable == 0:
            return None, metrics
        batch = take_groups(concat_rollouts(kept, pad_id), usable)
        batch.meta["rollout_n"] = n
        metrics["sampling/groups_trained"] = float(usable)
        return batch, metrics

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        batch, metrics = self.collect_batch(step, timings)
        if batch is None:
            logger.warning(
                "step %d: no whole mini-batch of groups with varying accuracy; update skipped", step
            )
            metrics["actor/skipped"] = 1.0
            return {**metrics, **timings}
        if cfg.rollout.free_cache_engine:  # colocated: give the memory to the actor
            with timed(timings, "rollout_sleep"):
                self.rollout.execute_all("sleep")  # the weight sync below wakes it
        with timed(timings, "old_log_prob"):
            old = self.actor.compute_log_prob(batch)
        batch.tensors["old_log_probs"] = old["old_log_probs"]
        with timed(timings, "adv"):
            scores = torch.tensor(np.asarray(batch.non_tensors["score"], dtype=np.float32))
            batch.tensors["advantages"] = compute_advantage(
                cfg.algorithm.adv_estimator,
                scores,
                batch["response_mask"],
                list(batch.non_tensors["uid"]),
                **(
                    {"norm_adv_by_std_in_grpo": cfg.algorithm.norm_adv_by_std_in_grpo}
                    if cfg.algorithm.adv_estimator == "grpo"
                    else {}
                ),
            )
        with timed(timings, "update"):
            actor_metrics = self.actor.update_policy(batch)
        bad = finite_or_raise(actor_metrics, ("actor/pg_loss", "actor/grad_norm"))
        if bad:
            message = (
                f"step {step}: non-finite {', '.join(bad)} "
                f"({', '.join(f'{k}={actor_metrics[k]}' for k in bad)})"
            )
            if cfg.trainer.nan_policy == "stop":
                raise TrainingStopped(
                    message + "; stopping (trainer.nan_policy=stop). Lower actor.lr or set "
                    "trainer.nan_policy=skip to skip such steps"
                )
            # DeepSpeed already dropped every optimizer step whose gradient norm was
            # non-finite; the run goes on with the next step.
            logger.warning("%s; update skipped (trainer.nan_policy=skip)", message)
            metrics["actor/nan_skipped"] = 1.0
        metrics.update(actor_metrics)
        with timed(timings, "sync"):
            metrics.update(self.sync_weights())
        total = time.perf_counter() - step_start
        tokens = float(batch["attention_mask"].sum())
        n_devices = max(cfg.resources.actor_world_size, 1)
        metrics.update(
            {
                "perf/step_seconds": total,
                "perf/tokens": tokens,
                "perf/throughput_tokens_per_s": tokens / total,
                "perf/throughput_tokens_per_s_per_device": tokens / total / n_devices,
            }
        )
        return {**metrics, **timings}

    # ----------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        from fipo_trainer.trainer.validation_metrics import compute_validation_metrics

        cfg = self.cfg
        timings: dict[str, float] = {}
        with timed(timings, "validate"):
            prompts = self.val_prompts.all_prompts(uid_prefix="val")
            sampling = cfg.rollout.val_sampling()
            if sampling.seed is None:
                sampling = dataclasses.replace(sampling, seed=cfg.trainer.seed)
            rollout, _ = self.generate_and_grade(prompts, sampling, timings)
            records = [
                {
                    "data_source": rollout.non_tensors["data_source"][i],
                    "uid": rollout.non_tensors["uid"][i],
                    "score": float(rollout.non_tensors["score"][i]),
                    "acc": bool(rollout.non_tensors["acc"][i]),
                    "pred": rollout.non_tensors["pred"][i],
                }
                for i in range(len(rollout))
            ]
            metrics = compute_validation_metrics(records)
            lengths = rollout["response_mask"].float().sum(-1)
            metrics["val/response_length_mean"] = float(lengths.mean())
        # gen/reward time spent inside validation, kept apart from the training step's
        stage_times = {
            key.replace("timing_s/", "timing_s/val_"): value
            for key, value in timings.items()
            if key != "timing_s/validate"
        }
        return {**metrics, **stage_times, "timing_s/validate": timings["timing_s/validate"]}

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> Path:
        def write(path: Path) -> None:
            self.actor.save_checkpoint(str(path / "actor"))

        state = {
            "step": step,
            "sampler": self.prompts.state_dict(),
            "rng": rng_state(),
            "config": dataclasses.asdict(self.cfg),
        }
        return self.ckpt.save(step, write, state)

    def maybe_resume(self) -> int:
        path = self.ckpt.resolve_resume(self.cfg.trainer.resume)
        if path is None:
            return 0
        state = self.ckpt.load_trainer_state(path)
        self.actor.load_checkpoint(str(Path(path) / "actor"))
        self.prompts.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"])

    # ----------------------------------------------------------------- the run
    def total_steps(self) -> int:
        cfg = self.cfg.trainer
        if cfg.total_training_steps:
            return int(cfg.total_training_steps)
        per_epoch = max(len(self.prompts) // self.cfg.data.train_batch_size, 1)
        return per_epoch * cfg.total_epochs

    def fit(self) -> TrainResult:
        from fipo_trainer.trainer.checkpoint import CheckpointManager
        from fipo_trainer.trainer.rollout_dump import dump_rollouts
        from fipo_trainer.trainer.tracking import Tracker

        cfg = self.cfg
        self._build_data()
        self._start_roles()
        self.ckpt = CheckpointManager(self.run_dir, cfg.trainer.max_ckpt_to_keep)
        start_step = self.maybe_resume()
        if start_step:
            self.sync_weights()  # the engines still hold the initial weights
        total = self.total_steps()
        tracker = Tracker(
            list(cfg.trainer.loggers),
            self.run_dir,
            cfg.trainer.project_name,
            cfg.trainer.experiment_name,
            dataclasses.asdict(cfg),
            total,
            start_step,
        )
        result = TrainResult(run_dir=self.run_dir, steps=start_step)
        last_ckpt_step = start_step if start_step else None
        try:
            if cfg.trainer.val_before_train and start_step == 0 and cfg.trainer.test_freq > 0:
                val = self.validate()
                result.validations.append({"step": 0, **val})
                tracker.log(val, step=0)
            for step in range(start_step + 1, total + 1):
                metrics = self.train_step(step)
                metrics["train/epoch"] = float(self.prompts.epoch)
                if step == start_step + 1:
                    metrics.update(self.data_metrics())
                if cfg.trainer.test_freq > 0 and (
                    step % cfg.trainer.test_freq == 0 or step == total
                ):
                    val = self.validate()
                    metrics.update(val)
                    result.validations.append({"step": step, **val})
                if cfg.trainer.rollout_dump_freq > 0 and step % cfg.trainer.rollout_dump_freq == 0:
                    dump_rollouts(self.run_dir, step, self._dump_records())
                if cfg.trainer.save_freq > 0 and (
                    step % cfg.trainer.save_freq == 0 or step == total
                ):
                    with timed(metrics, "save"):
                        result.checkpoint = self.save_checkpoint(step)
                    last_ckpt_step = step
                tracker.log(metrics, step=step)
                result.history.append({"step": step, **metrics})
                result.steps = step
            if cfg.trainer.save_freq <= 0 and last_ckpt_step != result.steps and result.steps:
                result.checkpoint = self.save_checkpoint(result.steps)
            if cfg.trainer.export_hf:
                result.export_dir = Path(self.actor.export_hf(str(self.run_dir / "hf_model")))
        finally:
            tracker.close()
        if cfg.trainer.plot:
            from fipo_trainer.trainer.plot import plot_run

            result.plot = plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        return result

    def data_metrics(self) -> dict[str, float]:
        """What loading the datasets dropped (logged once, with the first step)."""
        out = {}
        for split, source in (("train", self.prompts), ("val", self.val_prompts)):
            stats = source.dataset.stats
            prefix = "data/" if split == "train" else "data/val_"
            out[f"{prefix}prompts"] = float(len(source))
            out[f"{prefix}skipped_bad_rows"] = float(stats.skipped_bad)
            out[f"{prefix}dropped_too_long"] = float(stats.dropped_too_long)
        return out

    def _dump_records(self) -> list[dict[str, Any]]:
        b = self._last_rollouts
        nt = b.non_tensors
        return [
            {
                "uid": nt["uid"][i],
                "data_source": nt["data_source"][i],
                "prompt": nt["raw_prompt"][i] if "raw_prompt" in nt else None,
                "response": nt["response_text"][i],
                "ground_truth": nt["ground_truth"][i],
                "score": float(nt["score"][i]),
                "acc": bool(nt["acc"][i]),
                "pred": nt["pred"][i],
            }
            for i in range(len(b))
        ]

    def shutdown(self) -> None:
        from fipo_trainer.cluster.resource_pool import release

        for role in (self.rollout, self.actor):
            if role is not None:
                with contextlib.suppress(Exception):
                    if role is self.rollout:
                        role.execute_all("shutdown")
                    role.shutdown()
        if self.reward_pool is not None:
            self.reward_pool.close()
        if self.placements:
            with contextlib.suppress(Exception):
                release(self.placements)


def validation_summary(validations: list[dict[str, float]]) -> tuple[str, float, float] | None:
    """(metric, first value, best value) of the overall mean@k validation accuracy."""
    if not validations:
        return None
    keys = sorted(k for k in validations[0] if k.startswith("val/mean@"))
    if not keys:
        return None
    key = keys[0]
    values = [v[key] for v in validations if key in v]
    return key, values[0], max(values)


def print_summary(result: TrainResult) -> None:
    """Where everything went, and how validation moved."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fipo-train: {result.steps} steps", show_header=False)
    rows = [
        ("run directory", result.run_dir),
        ("metrics", result.run_dir / "metrics.jsonl"),
        ("tensorboard", result.run_dir / "tensorboard"),
        ("rollout dumps", result.run_dir / "rollouts"),
        ("curves (PNG)", result.plot),
        ("checkpoint", result.checkpoint),
        ("HF export", result.export_dir),
    ]
    summary = validation_summary(result.validations)
    if summary:
        key, first, best = summary
        rows.append((key, f"first {first:.3f} -> best {best:.3f} ({best - first:+.3f})"))
    for name, value in rows:
        if value is not None:
            table.add_row(name, str(value))
    Console().print(table)


def run_training(cfg: TrainConfig) -> TrainResult:
    """Run a whole training job from a validated config; always tears the roles down."""
    trainer = RLTrainer(cfg)
    try:
        result = trainer.fit()
    finally:
        trainer.shutdown()
    print_summary(result)
    return result
