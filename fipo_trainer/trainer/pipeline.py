"""Where a step's batch comes from: made when the step asks (``trainer.async_mode=off``) or
by a producer thread that runs ahead of the update (``one_step``, ``bounded``).

Why a thread on the driver, not a new role: generation already runs in the rollout workers
and grading in the reward processes, so the driver only has to *ask* for the next batch
while the actor updates; a thread that calls ``Sampler.collect`` does that, and the rest of
the loop stays the plain sequence of verbs.

Weight versions. Version v = the actor after v updates; the engines hold version v once the
sync after update v is loaded (it numbers them: ``WeightSync.start(version=v)``; the
producer may queue its next round behind the load), and every generated
token carries the version that produced it (``rollout_weight_version``). Update k trains
with the actor at version k-1, so a sample started at version s is ``k-1-s`` versions stale.

The producer may start the batch of step j once the engines hold version >= j-1-S:
- ``off``: no thread; S = 0, the batch of step k is made at version k-1.
- ``one_step``: S = 1 and the producer holds the engines for a whole batch, so the sync
  after update k waits for batch k+1's last round: batch k+1 is made entirely at version
  k-1. The sync goes in once that round is known to be the last (``trainer/settling.py``),
  and queues behind it on the rollout workers while the driver assembles the batch.
- ``bounded``: S = ``trainer.max_staleness``; the producer gives the engines up between
  calls (a generation round, or with ``partial_rollout`` a segment of
  ``partial_rollout_tokens`` tokens), so a sync lands while a batch is being made; in-flight
  responses then continue on the new weights (partial) or had finished on the old ones.

Syncs and validation take the engines through :meth:`BatchSource.engines` (they go first:
the producer waits while the trainer asks). A sync followed by a validation keeps the
trainer's place: were the producer let in between, the validation would wait for a whole
batch and the update after it would then run with the engines idle. A checkpoint pauses the
producer at a batch boundary and stores the batches made ahead (``state_dict``), so a resumed
run trains on exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fipo_trainer.data.batch import Batch
from fipo_trainer.trainer.engine_turn import EngineTurn
from fipo_trainer.trainer.step_metrics import timed

logger = logging.getLogger(__name__)


@dataclass
class MadeBatch:
    """One step's batch as the producer left it (``batch`` None: no whole mini-batch)."""

    step: int
    batch: Batch | None
    metrics: dict[str, float]
    timings: dict[str, float]
    rollouts: Batch | None = None  # every response of the step (for dumps)
    epoch: float = 0.0


def staleness_metrics(batch: Batch, version: int) -> dict[str, float]:
    """How many versions behind the training actor (``version``) each sample started."""
    if "rollout_weight_version" not in batch.tensors:
        return {}
    versions = batch["rollout_weight_version"]
    started = versions.masked_fill(versions < 0, 2**62).min(dim=-1).values
    started = started[started < 2**62]  # rows with no response token carry no version
    if started.numel() == 0:
        return {}
    stale = (version - started).float()
    per_row = versions.masked_fill(versions < 0, -(2**62)).max(dim=-1).values
    mixed = (per_row[per_row >= 0] > started).float()  # tokens from two or more versions
    return {
        "async/mixed_version_frac": float(mixed.mean()),
        "async/staleness_max": float(stale.max()),
        "async/staleness_mean": float(stale.mean()),
        "async/weight_version": float(version),
    }


@dataclass
class BatchSource:
    """The step's batch: made on demand (off) or taken from what the producer made ahead.

    ``version`` is the weight version the engines hold; ``ahead`` the batches a resumed run
    restores from its checkpoint (they are served first, in order); ``last_version`` the
    run's last step: once the engines hold it, the producer starts no more batches.
    """

    sampler: Any
    mode: str = "off"
    max_staleness: int = 0
    version: int = 0
    ahead: list[MadeBatch] = field(default_factory=list)
    partial_rollout_tokens: int | None = None  # bounded + partial_rollout
    last_version: int | None = None
    last_rollouts: Batch | None = None

    def __post_init__(self) -> None:
        self.turn = EngineTurn()
        self.staleness = {"off": 0, "one_step": 1}.get(self.mode, self.max_staleness)
        self._made: queue.Queue[MadeBatch | BaseException] = queue.Queue()
        for made in self.ahead:
            self._made.put(made)
        self._next_step = self.ahead[-1].step + 1 if self.ahead else None
        self._cond = threading.Condition()
        self._stop = self._paused = False
        self._producing = False
        self._thread: threading.Thread | None = None
        self._prompts_made: dict[str, Any] | None = None  # the prompts' state after the last
        # batch made whole: a checkpoint's, whatever the producer has drawn since; so too the
        # grader's failed rounds in a row (a resumed run must not get its full allowance back)
        self._streak_made = 0
        if self.mode == "bounded":  # the sampler gives the engines up between its calls
            self.sampler.turn = self.turn.producer
            self.sampler.partial_rollout_tokens = self.partial_rollout_tokens
        if self.mode == "one_step":  # a settled batch lets the sync in (queued behind it)
            self.sampler.on_settled = self.turn.settle

    # ----------------------------------------------------------------- trainer side
    def start(self, first_step: int) -> None:
        """Start making batches from ``first_step`` (async modes; off makes them on demand).

        Batches past the run's last step that start before the engines hold its weights are
        made and kept in the final checkpoint: a run resumed with more steps could not make
        them again at their version. Later ones are not started: a resumed run makes them at
        the same version, and this run has no use for them (on the paper's layout one costs
        minutes of every GPU)."""
        if self._next_step is None:
            self._next_step = first_step
        self._prompts_made = self.sampler.prompts.state_dict()
        self._streak_made = self.sampler.reward_health.streak
        if self.mode != "off":
            self._thread = threading.Thread(
                target=self._produce, name="batch-producer", daemon=True
            )
            self._thread.start()

    def next(self, step: int, timings: dict[str, float]) -> tuple[Batch | None, dict[str, float]]:
        """The batch of ``step`` and its metrics (waits for the producer when it is behind)."""
        if self.mode == "off" and self._made.empty():
            made = self._make(step)
        else:
            with timed(timings, "wait_batch"):
                made = self._take()
        if made.step != step:
            raise RuntimeError(f"the batch producer made step {made.step}'s batch for step {step}")
        timings.update(made.timings)
        self.last_rollouts = made.rollouts
        metrics = {**made.metrics, "train/epoch": made.epoch}
        if made.batch is not None:
            metrics |= staleness_metrics(made.batch, self.version)
            if metrics.get("async/staleness_max", 0.0) > self.staleness:
                raise RuntimeError(
                    f"step {step} got a sample {metrics['async/staleness_max']:.0f} versions "
                    f"stale; the bound is {self.staleness} (trainer.async_mode={self.mode})"
                )
        return made.batch, metrics

    @contextlib.contextmanager
    def engines(self, keep_place: bool = False, *, sync: bool = False) -> Iterator[None]:
        """Hold the engines and the grader (weight sync, validation) between producer calls;
        ``keep_place``: the trainer's next hold comes first too (see the module docstring);
        ``sync``: only to submit calls the rollout workers may run after the producer's."""
        with self.turn.trainer(keep_place, sync=sync):
            yield

    def weights_synced(self, version: int) -> None:
        """The engines now hold ``version``: batches that waited for it may start. Returns
        once a batch the sync went in beside is made (the sync's wait and deadline follow)."""
        with self._cond:
            self.version = version
            self._cond.notify_all()
        self.turn.wait_unsettled()

    def state_dict(self) -> dict[str, Any]:
        """The batches made ahead and ``prompts``, the prompt source's state after them, with
        the grader's failed rounds in a row then (the producer pauses at a batch boundary
        first). A batch that failed ahead of the trainer does not fail the checkpoint: it keeps
        the batches before it, and the error is raised at the step that needs the batch (a run
        whose last step is trained never does)."""
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: not self._producing or self._stop)
        items = []
        while not self._made.empty():
            items.append(self._made.get())
        for item in items:  # they are still this run's next batches (or error)
            self._made.put(item)
        ahead = []
        for item in items:
            if isinstance(item, BaseException):
                logger.warning("a batch made ahead failed (%s); the checkpoint keeps the "
                               "%d before it", item, len(ahead))  # fmt: skip
                break
            ahead.append(made_to_plain(item))
        return {
            "ahead": ahead,
            "version": self.version,
            "prompts": self._prompts_made,
            "reward_streak": self._streak_made,
        }

    def resume(self) -> None:
        """Let the producer go on after ``state_dict``."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.turn.give_up_kept_places()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    # ----------------------------------------------------------------- producer side
    def _make(self, step: int) -> MadeBatch:
        timings: dict[str, float] = {}
        batch, metrics = self.sampler.collect(step, timings)
        epoch = float(self.sampler.prompts.epoch)
        self._prompts_made = self.sampler.prompts.state_dict()
        self._streak_made = self.sampler.reward_health.streak
        return MadeBatch(step, batch, metrics, timings, self.sampler.last_rollouts, epoch)

    def _take(self) -> MadeBatch:
        while True:
            try:
                item = self._made.get(timeout=0.5)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the batch producer stopped without a batch") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def _may_start(self, step: int) -> bool:
        if self._stop:
            return True
        done = self.last_version is not None and self.version >= self.last_version
        return not (self._paused or done) and self.version >= step - 1 - self.staleness

    def _produce(self) -> None:
        try:
            while True:
                with self._cond:
                    step = self._next_step
                    self._cond.wait_for(lambda s=step: self._may_start(s))
                    if self._stop:
                        return
                    self._producing = True
                try:
                    whole = self.turn.producer() if self.mode == "one_step" else None
                    with whole or contextlib.nullcontext():
                        made = self._make(step)
                    self._made.put(made)  # before `producing` ends: a checkpoint waits for it
                    self._next_step = step + 1
                finally:
                    with self._cond:
                        self._producing = False
                        self._cond.notify_all()
        except BaseException as err:  # the trainer re-raises it at its next batch
            self._made.put(err)


def _plain(value: Any) -> Any:
    """Python values only (numpy scalars and arrays unpacked): what a checkpoint may hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _batch_to_plain(batch: Batch | None) -> dict[str, Any] | None:
    if batch is None:
        return None
    non_tensors = {k: [_plain(v) for v in arr] for k, arr in batch.non_tensors.items()}
    return {"tensors": dict(batch.tensors), "non_tensors": non_tensors, "meta": _plain(batch.meta)}


def _batch_from_plain(state: dict[str, Any] | None) -> Batch | None:
    if state is None:
        return None
    non_tensors = {}
    for key, values in state["non_tensors"].items():
        arr = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):  # element-wise: a list value stays one object
            arr[i] = v
        non_tensors[key] = arr
    return Batch(state["tensors"], non_tensors, state["meta"])


def made_to_plain(made: MadeBatch) -> dict[str, Any]:
    """A made-ahead batch as tensors and plain values (checkpoints load weights-only)."""
    return {
        "step": made.step,
        "batch": _batch_to_plain(made.batch),
        "metrics": dict(made.metrics),
        "timings": dict(made.timings),
        "rollouts": _batch_to_plain(made.rollouts),
        "epoch": made.epoch,
    }


def made_from_plain(state: dict[str, Any]) -> MadeBatch:
    return MadeBatch(
        int(state["step"]),
        _batch_from_plain(state["batch"]),
        dict(state["metrics"]),
        dict(state["timings"]),
        _batch_from_plain(state["rollouts"]),
        float(state["epoch"]),
    )


def batch_source(
    trainer_cfg: Any,
    sampler: Any,
    start_step: int,
    resume: tuple[Any, dict] | None,
    last_step: int | None = None,
) -> BatchSource:
    """The run's ``BatchSource`` from ``trainer.*`` (and a resumed checkpoint's batches)."""
    state = (resume[1].get("pipeline") if resume else None) or {}
    sampler.reward_health.streak = int(state.get("reward_streak", 0))
    partial = trainer_cfg.partial_rollout and trainer_cfg.async_mode == "bounded"
    return BatchSource(
        sampler,
        mode=trainer_cfg.async_mode,
        max_staleness=trainer_cfg.max_staleness,
        version=start_step,
        ahead=[made_from_plain(m) for m in state.get("ahead", [])],
        partial_rollout_tokens=trainer_cfg.partial_rollout_tokens if partial else None,
        last_version=last_step,
    )
