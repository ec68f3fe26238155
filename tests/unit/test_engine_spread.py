"""``EngineSpread``: the forked-engine count each training batch uses, chosen by measured
step time (``rollout.engine_spread=auto``)."""

from __future__ import annotations

import pytest

from fipo_trainer.rollout import RolloutConfig
from fipo_trainer.rollout.engine_spread import EngineSpread


def _run(spread: EngineSpread, seconds: dict[int, float], batches: int) -> list[int]:
    """Feed ``batches`` batches that take ``seconds[count]``; the counts used."""
    used = []
    for i in range(batches):
        count = spread.choose()
        used.append(count)
        spread.record(count, None if i == 0 else seconds[count])
    return used


def test_warmup_then_a_trial_of_each_count_then_the_faster_one():
    spread = EngineSpread([1, 2], trial=3, revisit=5, warmup=2)
    used = _run(spread, {2: 0.34, 1: 0.25}, 2 + 3 + 3 + 5)
    assert used == [2, 2] + [2, 2, 2] + [1, 1, 1] + [1] * 5
    assert spread.best == 1 and spread.switches == 1
    # the first batch of a block pays for the block before it: dropped
    assert list(spread.samples[2]) == [0.34, 0.34]
    assert spread.metrics() == {
        "rollout/engine_spread_best": 1.0,
        "rollout/engine_spread_s_2": 0.34,
        "rollout/engine_spread_s_1": 0.25,
    }


def test_the_batch_that_ends_a_trial_logs_the_medians_the_pick_was_made_on():
    """The case of a CI run: two engines won the trial, then their next batch came slower.
    The chosen count's logged median moves with it while the pick stands (a drift needs a
    whole trial's worth of batches), so the pick is checked against the trial's end row."""
    spread = EngineSpread([1, 2], trial=4, revisit=50, warmup=2)
    for count, seconds in [(2, None)] + [(2, 0.3)] * 5 + [(1, 0.31)] * 4:
        assert spread.choose() == count
        spread.record(count, seconds)
    at_pick = spread.metrics()
    assert at_pick["rollout/engine_spread_best"] == 2.0
    assert at_pick["rollout/engine_spread_s_2"] < at_pick["rollout/engine_spread_s_1"]
    for seconds in (0.4, 0.4):
        spread.record(spread.choose(), seconds)
    after = spread.metrics()
    assert after["rollout/engine_spread_best"] == 2.0
    assert after["rollout/engine_spread_s_2"] > after["rollout/engine_spread_s_1"]


def test_generation_bound_keeps_every_engine_and_trials_again_ever_later():
    spread = EngineSpread([1, 2], trial=3, revisit=4, max_revisit=10, warmup=0)
    used = _run(spread, {2: 0.43, 1: 0.56}, 3 + 3 + 4 + 3 + 8 + 3 + 10 + 3 + 10)
    trial = [1] * 3
    assert used == [2] * 3 + trial + [2] * 4 + trial + [2] * 8 + trial + [2] * 10 + trial + [2] * 10
    assert spread.best == 2 and spread.switches == 0 and spread.revisit == 10


def test_it_switches_when_the_other_count_becomes_faster():
    spread = EngineSpread([1, 2], trial=2, revisit=2, warmup=0)
    _run(spread, {2: 0.3, 1: 0.4}, 4)
    assert spread.best == 2
    # later batches: one engine got faster (e.g. the actor's update grew)
    for count, seconds in ((2, 0.45), (2, 0.45), (1, 0.45), (1, 0.3)):
        assert spread.choose() == count
        spread.record(count, seconds)
    assert spread.best == 1 and spread.switches == 1
    assert spread.revisit == 2  # a switch starts the waits again from the shortest


def test_a_batch_recorded_on_another_count_than_planned_is_refused():
    spread = EngineSpread([1, 2], warmup=1)
    with pytest.raises(ValueError, match="on 1 engines; 2 were planned"):
        spread.record(1, 0.2)


@pytest.mark.parametrize(
    ("counts", "kwargs", "match"),
    [
        ([], {}, "engine counts"),
        ([0, 1], {}, "engine counts"),
        ([1, 2], {"trial": 1}, "trial"),
        ([1, 2], {"drift": 0.0}, "drift must be > 0"),
    ],
)
def test_bad_settings_are_refused(counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineSpread(counts, **kwargs)


def test_the_config_key_is_checked():
    RolloutConfig(engine_spread="all").validate()
    with pytest.raises(ValueError, match=r"rollout\.engine_spread must be 'auto' or 'all'"):
        RolloutConfig(engine_spread="some").validate()


def test_a_chosen_count_that_grows_slower_than_another_was_measured_is_tried_again_at_once():
    spread = EngineSpread([1, 2], trial=3, revisit=50, warmup=0)
    _run(spread, {2: 0.72, 1: 0.55}, 6)
    assert spread.best == 1 and spread.revisit == 50
    # the run's batches need more rounds now: one engine takes 1.0 s, two 0.8 s
    used = _run_on(spread, {2: 0.8, 1: 1.0}, 2 + 3 + 3)
    # two slow batches refill one engine's median (1.0 > 1.2 x 0.72): two are tried at once
    assert used == [1, 1] + [2] * 6
    assert spread.best == 2 and spread.switches == 2
    assert spread.revisit == 50  # the wait starts again


def test_noise_below_the_drift_margin_waits_for_the_revisit():
    spread = EngineSpread([1, 2], trial=3, revisit=20, warmup=0)
    _run(spread, {2: 0.72, 1: 0.55}, 6)
    used = _run_on(spread, {2: 0.72, 1: 0.8}, 19)  # 0.8 < 1.2 x 0.72
    assert used == [1] * 19


def _run_on(spread: EngineSpread, seconds: dict[int, float], batches: int) -> list[int]:
    """Like ``_run``, continuing a run (every batch has a previous one)."""
    used = []
    for _ in range(batches):
        count = spread.choose()
        used.append(count)
        spread.record(count, seconds[count])
    return used
