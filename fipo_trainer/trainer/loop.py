"""The RL loop: one training step is the sequence of the roles' verbs.

The driver process owns the loop and only moves ``Batch`` objects between roles; every
heavy step runs in a worker (vLLM rollout, DeepSpeed actor, reward process pool). Each
stage returns only the fields it adds (``data/schema.py``), merged with ``batch |= ...``::

    batch, metrics = batches.next(step)           # generate + grade + dynamic sampling
    rollout.sleep()                               # colocated: free the engines' memory
    batch |= actor.compute_log_prob(batch, temperature=T)  # bypass_mode: the engine's
    metrics |= logprob_metrics(batch)             # rollout/actor mismatch, actor entropy
    batch, metrics = rollout_correction(batch, metrics, cfg.algorithm)  # + rollout_corr/*
    batch |= advantages(batch, cfg.algorithm)     # pure
    metrics |= actor.update(batch, temperature=T, global_step=step)
    metrics |= weight_sync.sync(version=step)     # the engines now hold version `step`

``trainer.async_mode`` decides when ``batches`` makes a batch (``trainer/pipeline.py``): on
demand, or ahead while the actor updates. ``T`` is the rollout's training temperature, so the
actor's log-probs are those of the distribution the engine sampled from. Validation every
``test_freq``, a checkpoint every ``save_freq``, metrics every step, the plot at the end.

Every remote call has a deadline (``trainer.call_timeout_s``, ``rollout.generate_timeout_*``):
a stalled worker is named. Ctrl-C kills the workers and :class:`TrainingInterrupted` says where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from fipo_trainer.trainer import resume_check
from fipo_trainer.trainer.checkpoint import rng_state, set_rng_state
from fipo_trainer.trainer.config import TrainConfig
from fipo_trainer.trainer.interrupt import TrainingInterrupted, interrupted
from fipo_trainer.trainer.pipeline import batch_source
from fipo_trainer.trainer.rollout_correction import rollout_as_old_log_probs, rollout_correction
from fipo_trainer.trainer.sampling import Sampler, TrainingStopped
from fipo_trainer.trainer.stages import advantages
from fipo_trainer.trainer.step_metrics import logprob_metrics, nonfinite_update, perf_metrics, timed
from fipo_trainer.trainer.summary import TrainResult, print_summary
from fipo_trainer.trainer.timeline import RunTimeline
from fipo_trainer.trainer.token_record import dump_step_tokens, record_kwargs
from fipo_trainer.trainer.tracking import restore_checkpoint_row, sanitize_metrics

__all__ = ["RLTrainer", "TrainResult", "TrainingInterrupted", "TrainingStopped"]
__all__ += ["advantages", "run_training"]

logger = logging.getLogger(__name__)


class RLTrainer:
    """Builds the roles from an already validated ``TrainConfig`` and runs the loop.

    Validation is the caller's (``trainer.config.prepare_config``); nothing here rechecks it.
    """

    def __init__(self, cfg: TrainConfig, *, owns_ray: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.actor = self.rollout = self.reward_pool = self.weight_sync = self.placements = None
        self._owns_ray = owns_ray  # the caller started Ray for this run (trainer.launch)
        self.timeline = RunTimeline(cfg.trainer, self.run_dir)  # trainer.timeline_json_file

    @property
    def temperature(self) -> float:
        """The training temperature: the rollout samples at it, the actor divides by it."""
        return float(self.cfg.rollout.temperature)

    # ----------------------------------------------------------------- set-up
    def _start_roles(self) -> None:
        from fipo_trainer.actor.group import ActorGroup
        from fipo_trainer.cluster.cpu_split import split_cpus_for_overlap
        from fipo_trainer.cluster.resource_pool import place_roles
        from fipo_trainer.cluster.shared_weight_sync import SharedWeightSync
        from fipo_trainer.cluster.weight_sync import WeightSync
        from fipo_trainer.cluster.worker_group import Deadline
        from fipo_trainer.rewards.pool import RewardPool
        from fipo_trainer.rollout.group import GenerationDeadline, RolloutGroup
        from fipo_trainer.startup import settle_gc
        from fipo_trainer.trainer.launch import start_ray

        cfg, res = self.cfg, self.cfg.resources
        calls = Deadline(getattr(cfg.trainer, "call_timeout_s", None), "trainer.call_timeout_s")
        generation = GenerationDeadline.from_config(cfg.rollout)
        self._owns_ray = start_ray(cfg) or self._owns_ray  # then shutdown() stops it again
        tp = cfg.rollout.tensor_parallel_size
        self.placements = place_roles(res, rollout_tensor_parallel_size=tp)
        self.actor = ActorGroup(
            cfg.actor.to_actor_config(),
            res.actor_world_size,
            rollout_n=cfg.rollout.n,
            pool=self.placements["actor"],
            wait=res.placement == "colocated",  # then vLLM sizes its cache after the ranks
        )
        self.actor.worker_group.set_deadline(calls)
        self.rollout = RolloutGroup(
            cfg.model.path,
            cfg.rollout,
            res.rollout_workers,
            pool=self.placements["rollout"],
            deadline=calls,
            generation=generation,
            wait=res.placement == "colocated",
        )
        self._build_data()  # while the workers start (a resumed run's: built already)
        self.reward_pool = RewardPool(cfg.reward, graders=self.graders)  # what the data needs
        self.actor.wait_ready()  # split: the ranks and the engines start together
        self.rollout.wait_ready()
        sync = SharedWeightSync if res.placement == "colocated" else WeightSync
        bucket, seconds = cfg.rollout.update_weights_bucket_bytes, calls.seconds
        self.weight_sync = sync(self.actor, self.rollout, bucket_bytes=bucket, timeout_s=seconds)
        # Async on a CPU node: the engines and the ranks on cores of their own.
        split_cpus_for_overlap(res, cfg.trainer.async_mode, self.actor, self.rollout)
        settle_gc()  # `fipo-train` paused the GC for its start-up (fipo_trainer.startup)

    def _build_data(self, sampler_state: dict[str, Any] | None = None) -> None:
        """The prompt sources, once; ``sampler_state`` (a resume's) must fit the data."""
        from fipo_trainer.trainer.data_source import PromptSource, routed_graders

        if getattr(self, "prompts", None) is None:
            self.prompts = PromptSource.for_split(self.cfg, "train")
            self.val_prompts = PromptSource.for_split(self.cfg, "val")
            self.graders = routed_graders(self.cfg.reward, self.prompts, self.val_prompts)
        if sampler_state is not None:
            self.prompts.load_state_dict(sampler_state)

    # ----------------------------------------------------------------- one step
    def train_step(self, step: int, validate_next: bool = False) -> dict[str, float]:
        """One step; ``validate_next``: a validation follows, and goes before the producer."""
        cfg, T = self.cfg, self.temperature
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        batch, metrics = self.batches.next(step, timings)
        if batch is None:
            logger.warning(
                "step %d: no whole mini-batch of groups with varying accuracy; update skipped", step
            )
            self._engines_at(step, keep=validate_next)  # the actor is unchanged: `step` = step-1
            return {**metrics, "actor/skipped": 1.0, **timings}
        if cfg.rollout.free_cache_engine and cfg.resources.placement == "colocated":
            with timed(timings, "rollout_sleep"):
                self.rollout.sleep()  # the weight sync below wakes it
        if cfg.algorithm.rollout_correction.bypass_mode:  # π_old = π_rollout: no actor pass
            batch |= rollout_as_old_log_probs(batch)
        else:
            with timed(timings, "old_log_prob"):
                batch |= self.actor.compute_log_prob(batch, temperature=T)
            metrics |= logprob_metrics(batch)  # + rollout_corr/* below
            batch, metrics = rollout_correction(batch, metrics, cfg.algorithm)
        with timed(timings, "adv"):
            batch |= advantages(batch, cfg.algorithm)
        record = record_kwargs(cfg.trainer, step, len(batch))  # dump steps: per-token values
        with timed(timings, "update"):
            actor_metrics = self.actor.update(batch, temperature=T, global_step=step, **record)
        dump_step_tokens(self, step, batch, record)  # rollouts/tokens_step_N.jsonl
        metrics |= self._check_finite(step, actor_metrics)
        metrics |= actor_metrics
        with timed(timings, "sync"):
            metrics |= self._engines_at(step, self.weight_sync, keep=validate_next)
        seconds = time.perf_counter() - step_start
        metrics |= perf_metrics(batch, seconds, cfg.resources.actor_world_size)
        return {**metrics, **timings}

    def _engines_at(self, version: int, sync: Any = None, keep: bool = False) -> dict[str, float]:
        """The engines hold ``version`` (after ``sync``, between producer calls; a sync goes
        in once the producer's batch is settled). The producer is told at once: a rollout
        worker runs calls in submission order, so its next round queues behind the load."""
        with self.batches.engines(keep_place=keep, sync=sync is not None):
            finish = sync.start(version=version) if sync else None
            if finish is None:
                self.rollout.set_weights_version(version)
        self.batches.weights_synced(version)
        return finish() if finish else {}

    def _check_finite(self, step: int, actor_metrics: dict[str, float]) -> dict[str, float]:
        """Stop (``trainer.nan_policy=stop``) or count (``skip``) a non-finite update."""
        if (message := nonfinite_update(step, actor_metrics)) is None:
            return {}
        if self.cfg.trainer.nan_policy == "stop":
            raise TrainingStopped(
                message + "; stopping (trainer.nan_policy=stop). Lower actor.lr or set "
                "trainer.nan_policy=skip to skip such steps"
            )
        # DeepSpeed already dropped the optimizer steps of non-finite gradient norm; go on.
        logger.warning("%s; update skipped (trainer.nan_policy=skip)", message)
        return {"actor/nan_skipped": 1.0}

    # ----------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        from fipo_trainer.trainer.validation_metrics import validation_metrics

        cfg = self.cfg
        timings: dict[str, float] = {}
        with timed(timings, "validate"), self.batches.engines():
            prompts = self.val_prompts.all_prompts(uid_prefix="val")
            sampling = cfg.rollout.val_sampling()
            if sampling.seed is None:
                sampling = dataclasses.replace(sampling, seed=cfg.trainer.seed)
            rollout, _ = self.sampler.generate_and_grade(prompts, sampling, timings)
            metrics = validation_metrics(
                list(rollout["data_source"]),
                list(rollout["uid"]),
                [bool(a) for a in rollout["acc"]],
                list(rollout["pred"]),
                [float(x) for x in rollout["score"]],
            )
            metrics["val/response_length_mean"] = float(rollout["response_mask"].sum(-1).mean())
        # gen/reward time spent inside validation, kept apart from the training step's
        stage_times = {k.replace("timing_s/", "timing_s/val_"): v
                       for k, v in timings.items() if k != "timing_s/validate"}  # fmt: skip
        return {**metrics, **stage_times, "timing_s/validate": timings["timing_s/validate"]}

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, row: dict[str, float] | None = None) -> Path:
        pipeline = self.batches.state_dict()  # first: it waits for the batch being made
        state = {
            "step": step,
            # Plain floats (a weights-only load refuses numpy), warned of by the tracker.
            "metrics_row": None if row is None else sanitize_metrics(row, set(row)),
            "sampler": pipeline.pop("prompts"),  # after the batches made ahead, not mid-batch
            "pipeline": pipeline,
            "rng": rng_state(),
            "config": dataclasses.asdict(self.cfg),
        }
        try:
            return self.ckpt.save(step, lambda path: self.actor.save(str(path / "actor")), state)
        finally:
            self.batches.resume()

    def prepare_resume(self) -> None:
        """Before Ray, DeepSpeed or vLLM start (a bad checkpoint fails in seconds, or under
        ``auto`` gives way to an older valid one): clean crash leftovers; pick, verify, read and
        check (``resume_check``) the checkpoint; starting afresh or from another run's, set an
        earlier run in this run directory aside."""
        from fipo_trainer.trainer import checkpoint, run_outputs

        self.ckpt = checkpoint.CheckpointManager.for_run(self.cfg)
        self.ckpt.clean_leftovers()
        path = self.ckpt.resolve_resume(self.cfg.trainer.resume)
        if path is None or not Path(path).resolve().is_relative_to(self.ckpt.root.resolve()):
            run_outputs.set_aside_earlier_run(self.run_dir, str(self.cfg.trainer.resume), path)
        self._resume = resume_check.load_checked(path, self.ckpt, self.cfg)
        if self._resume is not None:  # stopped between a save and its step's row: write it
            _, state = self._resume
            restore_checkpoint_row(self.run_dir, state["step"], state.get("metrics_row"))

    def maybe_resume(self) -> int:
        """Load the checkpoint :meth:`prepare_resume` verified into the started roles."""
        if getattr(self, "_resume", None) is None:
            return 0
        path, state = self._resume
        self.actor.load(str(Path(path) / "actor"))
        set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"])

    # ----------------------------------------------------------------- the run
    def total_steps(self, num_rows: int | None = None) -> int:
        """``trainer.total_training_steps``, else the epochs' (of ``num_rows`` prompts, or
        of the loaded data)."""
        cfg = self.cfg.trainer
        if cfg.total_training_steps:
            return int(cfg.total_training_steps)
        rows = len(self.prompts) if num_rows is None else num_rows
        return max(rows // self.cfg.data.train_batch_size, 1) * cfg.total_epochs

    def _finished_already(self) -> TrainResult | None:
        """The checkpoint to resume is the run's last step: nothing to start, train or export
        again (on the paper's layout, starting the roles alone takes minutes)."""
        path, state = getattr(self, "_resume", None) or (None, {})
        rows = state.get("sampler", {}).get("num_rows")
        if path is None or rows is None or int(state["step"]) < self.total_steps(int(rows)):
            return None
        if resume_check.export_missing(self.cfg, self.run_dir, path):  # stopped exporting
            return None
        key = "total_training_steps" if self.cfg.trainer.total_training_steps else "total_epochs"
        logger.warning(
            "%s is the run's last step (%d): nothing to train. Raise trainer.%s to go on, or "
            "set trainer.resume=disable to start afresh", path, int(state["step"]), key,
        )  # fmt: skip
        return TrainResult(run_dir=self.run_dir, steps=int(state["step"]), checkpoint=Path(path))

    def fit(self) -> TrainResult:
        from fipo_trainer.trainer.data_source import data_metrics
        from fipo_trainer.trainer.rollout_dump import dump_rollouts, records_from_batch
        from fipo_trainer.trainer.tracking import Tracker

        cfg = self.cfg
        self.prepare_resume()  # before anything heavy starts
        if (finished := self._finished_already()) is not None:
            return finished
        if self._resume is not None:  # data before the workers: changed data fails in seconds
            self._build_data(self._resume[1]["sampler"])
        self._start_roles()
        self.sampler = Sampler(cfg, self.prompts, self.rollout, self.reward_pool)
        start_step = self.maybe_resume()
        if start_step:
            self.weight_sync.sync(version=start_step)  # they still hold the initial weights
        total = self.total_steps()
        self.batches = batch_source(cfg.trainer, self.sampler, start_step, self._resume, total)
        self.batches.start(start_step + 1)
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
            freq = cfg.trainer.test_freq
            if cfg.trainer.val_before_train and start_step == 0 and freq > 0:
                val = self.validate()
                result.validations.append({"step": 0, **val})
                tracker.log(val, step=0)
            for step in range(start_step + 1, total + 1):
                test = freq > 0 and (step % freq == 0 or step == total)  # validate after it
                metrics = self.train_step(step, validate_next=test)
                if step == start_step + 1:
                    metrics.update(data_metrics(self.prompts, self.val_prompts))
                if test:
                    val = self.validate()
                    metrics.update(val)
                    result.validations.append({"step": step, **val})
                if cfg.trainer.rollout_dump_freq > 0 and step % cfg.trainer.rollout_dump_freq == 0:
                    dump_rollouts(
                        self.run_dir, step, records_from_batch(self.batches.last_rollouts)
                    )
                if cfg.trainer.save_freq > 0 and (
                    step % cfg.trainer.save_freq == 0 or step == total
                ):
                    with timed(metrics, "save"):
                        result.checkpoint = self.save_checkpoint(step, metrics)
                    last_ckpt_step = step
                tracker.log(metrics, step=step)
                result.history.append({"step": step, **metrics})
                result.steps = step
            if cfg.trainer.save_freq <= 0 and last_ckpt_step != result.steps and result.steps:
                result.checkpoint = self.save_checkpoint(result.steps)
            if cfg.trainer.export_hf:
                export = self.run_dir / resume_check.EXPORT_DIR
                result.export_dir = Path(self.actor.export(str(export)))
        finally:
            self.batches.close()
            tracker.close()
        return result

    def plot(self, result: TrainResult) -> None:
        """The curves PNG, drawn after shutdown: matplotlib's ~0.2 GiB never adds to workers'."""
        if self.cfg.trainer.plot:
            from fipo_trainer.trainer.plot import plot_run as draw

            result.plot = draw(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
            self.timeline.plot()

    def shutdown(self, *, graceful: bool = True) -> None:
        """Stop every role and the Ray this run started (a sweep's next job starts afresh);
        ``graceful=False`` (Ctrl-C, failure) kills workers unasked: one may not answer."""
        from fipo_trainer.cluster import release, shutdown_ray

        self.timeline.write()  # while Ray still holds the task events
        if self.rollout is not None:
            with contextlib.suppress(Exception):
                self.rollout.shutdown(graceful=graceful)
        if self.actor is not None:
            with contextlib.suppress(Exception):
                self.actor.shutdown()
        if self.reward_pool is not None:
            self.reward_pool.close()
        if self.placements:
            with contextlib.suppress(Exception):
                release(self.placements)
        if self._owns_ray:
            self._owns_ray = False
            shutdown_ray()


def run_training(cfg: TrainConfig, *, owns_ray: bool = False) -> TrainResult:
    """Run a whole training job from a validated config (``prepare_config``); always tears
    the roles down (and Ray, if it started it or ``owns_ray``: ``trainer.launch`` did).
    Ctrl-C kills the workers and raises :class:`TrainingInterrupted`."""
    trainer = RLTrainer(cfg, owns_ray=owns_ray)
    try:
        result = trainer.fit()
    except KeyboardInterrupt as err:
        raise interrupted(trainer, err) from None
    except BaseException:
        trainer.shutdown(graceful=False)
        raise
    trainer.shutdown()
    trainer.plot(result)
    print_summary(result)
    return result
