"""BatchSource (trainer/pipeline.py): which weight version makes each step's batch, who
holds the engines, what a checkpoint stores. The sampler here only records the version the
engines held when it was asked (the real roles run in tests/e2e/test_async.py)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fipo_trainer.data.batch import Batch
from fipo_trainer.trainer.pipeline import (
    BatchSource,
    EngineTurn,
    batch_source,
    made_from_plain,
    made_to_plain,
    staleness_metrics,
)
from fipo_trainer.trainer.reward_health import RewardHealth


def versions_batch(rows: list[list[int]]) -> Batch:
    width = max(len(r) for r in rows)
    v = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        v[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Batch(
        {"rollout_weight_version": v},
        {"uid": np.array([f"u{i}" for i in range(len(rows))], dtype=object)},
    )


class VersionSampler:
    """Makes a one-row batch stamped with the engines' version at the time it is asked."""

    def __init__(self, source_ref: list, gen_s: float = 0.0) -> None:
        self.source_ref, self.gen_s = source_ref, gen_s
        self.prompts = SimpleNamespace(epoch=0, state_dict=dict)
        self.reward_health = RewardHealth()
        self.last_rollouts = None
        self.made: list[tuple[int, int]] = []
        self.turn = None

    def collect(self, step, timings):
        version = self.source_ref[0].version
        if getattr(self, "settle_first", False):
            self.on_settled()
        time.sleep(self.gen_s)
        self.made.append((step, version))
        return versions_batch([[version, version]]), {"sampling/step": float(step)}


def run(mode: str, steps: int, staleness: int = 0, update_s: float = 0.02, gen_s: float = 0.01):
    """Drive a BatchSource the way RLTrainer does; returns {step: (made version, metrics)}."""
    ref: list = []
    sampler = VersionSampler(ref, gen_s)
    source = BatchSource(sampler, mode=mode, max_staleness=staleness)
    ref.append(source)
    source.start(1)
    out = {}
    try:
        for step in range(1, steps + 1):
            batch, metrics = source.next(step, {})
            out[step] = (int(batch["rollout_weight_version"][0, 0]), metrics)
            time.sleep(update_s)  # the update
            with source.engines():
                pass  # the sync
            source.weights_synced(step)
    finally:
        source.close()
    return out


def test_off_makes_every_batch_with_the_previous_steps_weights():
    out = run("off", 5)
    assert [v for v, _ in out.values()] == [0, 1, 2, 3, 4]
    assert all(m["async/staleness_max"] == 0 for _, m in out.values())


def test_one_step_batch_k_is_made_at_version_k_minus_2_exactly_one_behind_off():
    out = run("one_step", 6, update_s=0.05)
    assert [v for v, _ in out.values()] == [0, 0, 1, 2, 3, 4]
    assert [m["async/staleness_max"] for _, m in out.values()] == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("bound", [0, 1, 2, 3])
def test_bounded_never_exceeds_its_bound_even_when_generation_is_fast(bound):
    out = run("bounded", 8, staleness=bound, update_s=0.05, gen_s=0.0)
    stale = [m["async/staleness_max"] for _, m in out.values()]
    assert max(stale) == bound  # fast generation runs ahead as far as allowed, no further
    for step, (made, _) in out.items():
        assert made >= step - 1 - bound


def test_trainer_goes_first_when_both_wait_for_the_engines():
    turn, order = EngineTurn(), []
    with turn.trainer():  # the engines are busy; a producer and the trainer queue up
        producer = threading.Thread(target=lambda: _hold(turn.producer, order, "producer"))
        producer.start()
        time.sleep(0.05)
        trainer = threading.Thread(target=lambda: _hold(turn.trainer, order, "trainer"))
        trainer.start()
        time.sleep(0.05)
    producer.join(2)
    trainer.join(2)
    assert order == ["trainer", "producer"]


def _hold(turn, order, name):
    with turn():
        order.append(name)


def test_a_sync_that_keeps_its_place_lets_the_validation_after_it_go_before_the_producer():
    """A producer let in between a sync and the validation after it made the validation wait
    a whole batch (0.2-0.6 s on the quickstart), and the next update then ran with the
    engines idle. The kept place outlasts the gap, however long; giving it up lets the
    producer in (a run that ends or fails before its validation)."""
    turn, order = EngineTurn(), []
    with turn.trainer(keep_place=True):  # the sync
        producer = threading.Thread(target=lambda: _hold(turn.producer, order, "producer"))
        producer.start()
        time.sleep(0.05)
    time.sleep(0.1)  # the loop between the sync and the validation
    assert order == []
    _hold(turn.trainer, order, "validation")
    producer.join(2)
    assert order == ["validation", "producer"]
    with turn.trainer(keep_place=True):
        pass
    producer = threading.Thread(target=lambda: _hold(turn.producer, order, "producer"))
    producer.start()
    time.sleep(0.05)
    assert order[2:] == []
    turn.give_up_kept_places()
    producer.join(2)
    assert order[2:] == ["producer"]


def test_a_sync_goes_in_beside_a_settled_producer_and_a_validation_waits_for_it():
    """A settled producer has submitted every call its batch needs; the sync's calls queue
    behind them on the rollout workers. Anything else (a validation, which grades too, or
    the producer's next batch) waits for the producer, and for the sync."""
    turn, order = EngineTurn(), []
    done = threading.Event()

    def producer():
        with turn.producer():
            order.append("producer")
            done.wait(2)
            order.append("producer ends")

    def hold(name, **kwargs):
        with turn.trainer(**kwargs):
            order.append(name)

    threads = [threading.Thread(target=producer)]
    threads[0].start()
    time.sleep(0.05)
    threads.append(threading.Thread(target=hold, args=("sync",), kwargs={"sync": True}))
    threads[1].start()
    time.sleep(0.05)
    assert order == ["producer"]  # not settled yet
    turn.settle()
    threads[1].join(2)
    assert order == ["producer", "sync"]
    threads.append(threading.Thread(target=hold, args=("validation",)))
    threads[2].start()
    time.sleep(0.05)
    assert order == ["producer", "sync"]
    done.set()
    for t in threads:
        t.join(2)
    assert order == ["producer", "sync", "producer ends", "validation"]
    turn.settle()  # outside a producer's turn: nothing to let in
    with turn.producer():
        blocked = threading.Thread(target=hold, args=("late sync",), kwargs={"sync": True})
        blocked.start()
        time.sleep(0.05)
        assert order[-1] == "validation"
    blocked.join(2)
    assert order[-1] == "late sync"


def test_one_step_lets_the_sync_in_once_the_sampler_settles_its_batch():
    ref: list = []
    sampler = VersionSampler(ref, gen_s=0.3)
    sampler.on_settled = None
    source = BatchSource(sampler, mode="one_step")
    ref.append(source)
    assert sampler.on_settled == source.turn.settle
    sampler.settle_first = True
    source.start(1)
    try:
        source.next(1, {})  # the producer goes on to batch 2 (one_step) and settles it at once
        time.sleep(0.05)
        start = time.monotonic()
        with source.engines(sync=True):
            synced_after = time.monotonic() - start
        assert synced_after < 0.2 and [step for step, _ in sampler.made] == [1]
        with source.engines():
            assert [step for step, _ in sampler.made] == [1, 2]
    finally:
        source.close()


@pytest.mark.parametrize(("mode", "staleness", "made"), [("one_step", 0, 5), ("bounded", 2, 6)])
def test_the_producer_starts_no_batch_once_the_engines_hold_the_last_step(mode, staleness, made):
    """Batches past the run's last step (4) that start before its weights are synced are made
    (the final checkpoint keeps them); none starts after: each used to cost a whole batch of
    generation that the final validation and checkpoint waited for."""
    ref: list = []
    sampler = VersionSampler(ref)
    source = BatchSource(sampler, mode=mode, max_staleness=staleness, last_version=4)
    ref.append(source)
    source.start(1)
    try:
        for step in range(1, 5):
            source.next(step, {})
            time.sleep(0.05)  # the update: the producer runs as far ahead as it may
            with source.engines():
                pass
            source.weights_synced(step)
        time.sleep(0.2)  # the final validation and checkpoint
        assert [step for step, _ in sampler.made] == list(range(1, made + 1))
        assert [m["step"] for m in source.state_dict()["ahead"]] == list(range(5, made + 1))
    finally:
        source.close()


def test_checkpoint_keeps_the_batches_made_ahead_and_a_resumed_source_serves_them_first():
    ref: list = []
    sampler = VersionSampler(ref)
    source = BatchSource(sampler, mode="bounded", max_staleness=2)
    ref.append(source)
    source.start(1)
    source.next(1, {})
    time.sleep(0.2)  # the producer runs ahead (steps 2 and 3 may start at version 0)
    state = source.state_dict()
    source.close()
    steps = [m["step"] for m in state["ahead"]]
    assert steps == [2, 3]
    restored = BatchSource(
        VersionSampler([]), mode="off", ahead=[made_from_plain(m) for m in state["ahead"]]
    )
    batch, metrics = restored.next(2, {})
    assert metrics["sampling/step"] == 2.0 and batch is not None


class FailedGradingSampler(VersionSampler):
    """Every batch's grading fails: one more failed round in a row (``RewardHealth.record``)."""

    def collect(self, step, timings):
        self.reward_health.streak += 1
        return super().collect(step, timings)


@pytest.mark.parametrize("mode", ["off", "one_step"])
def test_a_checkpoint_keeps_the_graders_failed_rounds_in_a_row(mode):
    """Resumed, a run whose grader kept failing used to start counting again from 0: it ran
    ``trainer.max_failed_reward_steps`` more failed rounds before it stopped."""
    ref: list = []
    sampler = FailedGradingSampler(ref)
    source = BatchSource(sampler, mode=mode)
    ref.append(source)
    source.start(1)
    source.next(1, {})
    state = source.state_dict()
    source.close()
    made = 1 + len(state["ahead"])  # one_step: the batch made ahead failed too
    assert state["reward_streak"] == made == sampler.reward_health.streak
    trainer_cfg = SimpleNamespace(
        async_mode=mode, max_staleness=1, partial_rollout=False, partial_rollout_tokens=8
    )
    pipeline = {k: v for k, v in state.items() if k != "prompts"}  # as the loop saves it
    resumed = VersionSampler([])
    batch_source(trainer_cfg, resumed, 1, ("ckpt", {"pipeline": pipeline}))
    assert resumed.reward_health.streak == made
    fresh = VersionSampler([])
    batch_source(trainer_cfg, fresh, 0, None)
    assert fresh.reward_health.streak == 0


class RoundsSampler(VersionSampler):
    """Draws a batch's prompts in two rounds, with generation between them."""

    def __init__(self, source_ref: list, fail_at: int | None = None, round_s=0.05) -> None:
        super().__init__(source_ref)
        self.drawn, self.round_s = 0, round_s
        self.fail_at = fail_at
        self.prompts = SimpleNamespace(epoch=0, state_dict=lambda: {"drawn": self.drawn})

    def collect(self, step, timings):
        for _ in range(2):
            self.drawn += 4
            time.sleep(self.round_s)
        if step == self.fail_at:
            raise RuntimeError(f"dynamic sampling exhausted at step {step}")
        return super().collect(step, timings)


def test_a_checkpoint_stores_the_prompts_drawn_for_the_batches_it_keeps():
    """Taken while the producer is between the rounds of a batch, the checkpoint's prompt
    state must be the one after that batch, which it waits for and keeps: the loop read the
    state first, mid-batch, and a resumed run drew that batch's first round again."""
    ref: list = []
    sampler = RoundsSampler(ref, round_s=0.25)
    source = BatchSource(sampler, mode="one_step")
    ref.append(source)
    source.start(1)
    try:
        source.next(1, {})
        time.sleep(0.1)  # batch 2 is in its first round
        assert sampler.drawn == 12
        state = source.state_dict()
        assert [m["step"] for m in state["ahead"]] == [2]
        assert state["prompts"] == {"drawn": 16}
    finally:
        source.close()


def test_a_batch_that_fails_ahead_of_the_trainer_does_not_fail_the_checkpoint():
    """The batch past the last step (or two steps ahead) may fail, e.g. dynamic sampling
    exhausted: the checkpoint keeps what came before it, with the prompts drawn for those,
    and the error waits for the step that needs the batch."""
    ref: list = []
    sampler = RoundsSampler(ref, fail_at=3)
    source = BatchSource(sampler, mode="one_step")
    ref.append(source)
    source.start(1)
    try:
        source.next(1, {})
        source.weights_synced(1)
        time.sleep(0.5)  # batch 2 made, batch 3 failed
        state = source.state_dict()
        assert [m["step"] for m in state["ahead"]] == [2]
        assert state["prompts"] == {"drawn": 16} and sampler.drawn == 24
        source.resume()
        assert source.next(2, {})[0] is not None
        with pytest.raises(RuntimeError, match="exhausted at step 3"):
            source.next(3, {})
    finally:
        source.close()


def test_producer_failure_reaches_the_trainer():
    class Failing(VersionSampler):
        def collect(self, step, timings):
            raise ValueError("grader exploded")

    source = BatchSource(Failing([]), mode="one_step")
    source.start(1)
    with pytest.raises(ValueError, match="grader exploded"):
        source.next(1, {})
    source.close()


def test_staleness_and_mixed_versions_from_per_token_stamps():
    batch = versions_batch([[3, 3, 4], [4, 4], [2]])
    m = staleness_metrics(batch, version=4)
    assert m["async/staleness_max"] == 2 and m["async/staleness_mean"] == pytest.approx(1.0)
    assert m["async/mixed_version_frac"] == pytest.approx(1 / 3)


def test_made_batch_round_trips_through_plain_values():
    batch = versions_batch([[1, 1], [2]])
    batch.non_tensors["acc"] = np.array([np.bool_(True), False], dtype=object)
    batch.non_tensors["raw_prompt"] = np.empty(2, dtype=object)
    batch.non_tensors["raw_prompt"][:] = [[{"role": "user", "content": "1+1"}]] * 2
    from fipo_trainer.trainer.pipeline import MadeBatch

    plain = made_to_plain(MadeBatch(4, batch, {"a": 1.0}, {"timing_s/gen": 2.0}, batch, 1.0))
    torch.save(plain, buf := __import__("io").BytesIO())
    buf.seek(0)
    back = made_from_plain(torch.load(buf, weights_only=True))
    assert back.step == 4 and back.batch["raw_prompt"][1] == [{"role": "user", "content": "1+1"}]
    assert torch.equal(back.batch["rollout_weight_version"], batch["rollout_weight_version"])
    assert list(back.batch["acc"]) == [True, False]
