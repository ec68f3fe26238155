"""Deadlines of remote calls (issue 12 item 1), without Ray: the generation deadline, the
config keys and their validation, ``wait_labelled``'s deadline / progress line / Ctrl-C on a
fake ``ray.wait``, the group plumbing, and ``run_training``'s Ctrl-C path."""

from __future__ import annotations

import logging
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import ray

from fipo_trainer.cli import compose_config
from fipo_trainer.cluster import waiting
from fipo_trainer.cluster.waiting import (
    CallTimeoutError,
    Deadline,
    RankLabel,
    WaitInterrupted,
    WorkerStartupError,
    wait_labelled,
)
from fipo_trainer.cluster.worker import Worker
from fipo_trainer.cluster.worker_group import WorkerGroup
from fipo_trainer.data.batch import Batch
from fipo_trainer.rollout.config import RolloutConfig
from fipo_trainer.rollout.group import (
    MIN_DEADLINE_ROWS,
    GenerationDeadline,
    RolloutGroup,
    plain_rollout_config,
)
from fipo_trainer.trainer.config import ConfigError, load_config, validate_config
from fipo_trainer.trainer.config.schema import TrainRolloutConfig

STRUCTURE = {"check_files": False, "check_platform": False}


def quick(*overrides: str):
    return load_config(compose_config(list(overrides)), build_model=False)


# --------------------------------------------------------------------------- generation


def test_generation_deadline_has_a_floor_and_grows_with_rows_and_tokens():
    d = GenerationDeadline()  # floor 120 s, 5e-4 s per token
    # the quickstart: 24 prompts x n 8 on one worker, 24 tokens -> the floor
    assert d.seconds(24 * 8, 24) == 120.0
    # the 32B recipe's shard: 2048 prompts x 16 / 16 workers, 20480 tokens
    assert d.seconds(2048, 20480) == pytest.approx(5e-4 * 2048 * 20480)
    # few but long responses still take max_tokens decode steps
    assert d.seconds(1, 20480) == d.seconds(MIN_DEADLINE_ROWS, 20480) > 120.0
    assert GenerationDeadline(floor_s=10, s_per_token=0.0).seconds(10**6, 10**6) == 10.0
    assert GenerationDeadline(timeout_s=7.5).seconds(10**6, 10**6) == 7.5


def test_generation_deadline_names_the_key_and_how_it_was_derived():
    derived = GenerationDeadline().for_call(192, 24)
    assert (derived.seconds, derived.key) == (120.0, "rollout.generate_timeout_s")
    for part in (
        "null = derived 120s",
        "rollout.generate_timeout_floor_s=120",
        "rollout.generate_timeout_s_per_token=0.0005",
        "192 rows x 24 tokens",
    ):
        assert part in derived.note
    fixed = GenerationDeadline(timeout_s=30).for_call(192, 24)
    assert (fixed.seconds, fixed.key, fixed.note) == (30.0, "rollout.generate_timeout_s", "")


# --------------------------------------------------------------------------- config


def test_deadline_keys_have_defaults_and_the_quickstart_names_a_stall_soon():
    cfg = quick()
    assert isinstance(cfg.rollout, TrainRolloutConfig)
    assert cfg.rollout.generate_timeout_s is None
    assert cfg.rollout.generate_timeout_floor_s == 120.0
    assert cfg.rollout.generate_timeout_s_per_token == 5e-4
    assert cfg.trainer.call_timeout_s == 300.0  # the quickstart's calls take seconds
    validate_config(cfg, **STRUCTURE)
    from fipo_trainer.trainer.config import TrainConfig

    assert TrainConfig().trainer.call_timeout_s == 3600.0
    assert quick("recipe=fipo_qwen2.5_32b_aime24").trainer.call_timeout_s == 7200.0
    set_ = quick("rollout.generate_timeout_s=45", "trainer.call_timeout_s=null")
    assert (set_.rollout.generate_timeout_s, set_.trainer.call_timeout_s) == (45.0, None)
    validate_config(set_, **STRUCTURE)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.call_timeout_s=0", r"trainer\.call_timeout_s must be > 0 seconds or null"),
        ("rollout.generate_timeout_s=-1", r"rollout\.generate_timeout_s must be > 0 seconds"),
        ("rollout.generate_timeout_floor_s=0", r"rollout\.generate_timeout_floor_s must be > 0"),
        ("rollout.generate_timeout_s_per_token=-1e-3", r"generate_timeout_s_per_token must be"),
    ],
)
def test_bad_deadlines_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(quick(override), **STRUCTURE)


def test_rollout_section_errors_keep_their_keys_next_to_the_deadline_ones():
    with pytest.raises(ConfigError) as info:
        validate_config(quick("rollout.top_p=0", "rollout.generate_timeout_s=0"), **STRUCTURE)
    assert "rollout.top_p" in str(info.value) and "rollout.generate_timeout_s" in str(info.value)


def test_the_engines_get_a_plain_rollout_config():
    section = TrainRolloutConfig(n=3, max_tokens=16, generate_timeout_s=9.0)
    plain = plain_rollout_config(section)
    assert type(plain) is RolloutConfig and (plain.n, plain.max_tokens) == (3, 16)
    assert plain_rollout_config({"n": 2}).n == 2


# --------------------------------------------------------------------------- wait_labelled


@pytest.fixture
def never_ready(monkeypatch):
    """A ``ray.wait`` on refs that never finish; records each slice's timeout."""
    slices: list[float | None] = []

    def wait(pending, *, num_returns, timeout):
        slices.append(timeout)
        time.sleep(timeout or 0)
        return [], list(pending)

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(waiting, "POLL_S", 0.05)
    return slices


def test_an_expired_deadline_names_role_rank_call_elapsed_and_key(never_ready, caplog):
    refs = [(RankLabel("rollout", 0), object())]
    start = time.monotonic()
    with (
        caplog.at_level(logging.INFO, logger=waiting.__name__),
        pytest.raises(CallTimeoutError) as info,
    ):
        wait_labelled(
            refs,
            what="generate_batch",
            timeout_s=0.4,
            timeout_key="rollout.generate_timeout_s",
            timeout_note="now null = derived",
            progress_every_s=0.1,
        )
    assert 0.4 <= time.monotonic() - start < 2.0
    err = info.value
    assert isinstance(err, TimeoutError)
    assert (err.role, err.ranks, err.method, err.key) == (
        "rollout",
        [0],
        "generate_batch",
        "rollout.generate_timeout_s",
    )
    assert err.elapsed_s >= 0.4 and err.timeout_s == 0.4
    msg = str(err)
    assert msg.startswith("worker group 'rollout': rank 0 did not finish generate_batch within 0s")
    assert "waited 0s" in msg and "raise rollout.generate_timeout_s (now null = derived)" in msg
    # interruptible: no single ray.wait longer than a slice
    assert never_ready and max(never_ready) <= 0.05
    progress = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert progress and progress[0].startswith(
        "still waiting for worker group 'rollout': rank 0 in generate_batch ("
    )
    assert "deadline 0s; 0 of 1 answered" in progress[0]


def test_pending_ranks_of_one_group_are_merged_in_the_message(never_ready):
    refs = [(RankLabel("actor", r), object()) for r in range(3)]
    with pytest.raises(CallTimeoutError, match=r"'actor': ranks 0, 1, 2 did not finish update"):
        wait_labelled(refs, what="update", timeout_s=0.1)


def test_start_up_timeouts_stay_start_up_errors(never_ready):
    with pytest.raises(WorkerStartupError, match="did not finish start-up"):
        wait_labelled(
            [("probe", object())], what="start-up", timeout_s=0.1, error=WorkerStartupError
        )
    with pytest.raises(WorkerStartupError, match="custom message"):
        wait_labelled(
            [("probe", object())],
            what="start-up",
            timeout_s=0.1,
            error=WorkerStartupError,
            on_timeout=lambda names: "custom message",
        )


def test_ctrl_c_during_a_wait_without_deadline_names_what_was_awaited(monkeypatch):
    calls = []

    def wait(pending, *, num_returns, timeout):
        calls.append(timeout)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [], list(pending)

    monkeypatch.setattr(ray, "wait", wait)
    with pytest.raises(WaitInterrupted, match=r"for worker group 'rollout': rank 0 in generate"):
        wait_labelled([(RankLabel("rollout", 0), object())], what="generate_batch")
    assert calls == [waiting.POLL_S] * 3  # no deadline, still short slices


def test_results_come_back_in_label_order(monkeypatch):
    a, b = object(), object()
    monkeypatch.setattr(ray, "wait", lambda pending, **kw: ([pending[-1]], pending[:-1]))
    monkeypatch.setattr(ray, "get", lambda ref: "a" if ref is a else "b")
    assert wait_labelled([("a", a), ("b", b)], what="x", timeout_s=5) == ["a", "b"]


# --------------------------------------------------------------------------- plumbing


class NapWorker(Worker):
    def nap(self, seconds: float) -> float:
        return seconds


class _Method:
    def remote(self, *args, **kwargs):
        return object()


class _Actor:
    nap = _Method()


def fake_group(deadline: Deadline | None = None) -> WorkerGroup:
    """A WorkerGroup of one fake actor (no Ray): only the call/wait path is exercised."""
    group = WorkerGroup.__new__(WorkerGroup)
    group.name, group.world_size, group.worker_cls = "rollout", 1, NapWorker
    group._actors, group._local = [_Actor()], {}  # no worker process on this machine
    group.deadline = deadline or Deadline()
    return group


def test_group_calls_wait_for_the_group_deadline_or_their_own(never_ready):
    group = fake_group()
    group.set_deadline(Deadline(0.1, "trainer.call_timeout_s"))
    with pytest.raises(CallTimeoutError) as info:
        group.call_all(NapWorker.nap, 1.0)
    assert (info.value.role, info.value.ranks, info.value.method) == ("rollout", [0], "nap")
    assert "raise trainer.call_timeout_s" in str(info.value)
    with pytest.raises(CallTimeoutError, match=r"raise my\.key"):
        group.call_rank(0, NapWorker.nap, 1.0, deadline=Deadline(0.1, "my.key"))
    with pytest.raises(CallTimeoutError, match=r"raise other\.key"):
        group.scatter(NapWorker.nap, [(1.0,)], deadline=Deadline(0.1, "other.key"))


def test_generate_waits_for_its_derived_deadline():
    seen = {}

    class Recorder:
        def scatter(self, fn, per_rank, **kwargs):
            seen.update(kwargs, shards=len(per_rank))
            raise RuntimeError("recorded")

        world_size = 2

    group = RolloutGroup.__new__(RolloutGroup)
    group.config = RolloutConfig(n=8, max_tokens=24)
    group.generation = GenerationDeadline(s_per_token=0.01)
    group._workers = Recorder()
    group.engines, group.tp = 2, 1
    ids = np.empty(24, dtype=object)
    ids[:] = [[1, 2, 3]] * 24
    with pytest.raises(RuntimeError, match="recorded"):
        group.generate(Batch(non_tensors={"prompt_token_ids": ids}))
    # 24 prompts over 2 workers: 12 x n 8 = 96 responses per worker x 24 tokens x 0.01 s
    assert seen["shards"] == 2
    assert seen["deadline"].seconds == pytest.approx(max(120.0, 0.01 * 96 * 24))
    assert seen["deadline"].key == "rollout.generate_timeout_s"


# --------------------------------------------------------------------------- Ctrl-C


@pytest.fixture
def trainer_cfg(tmp_path):
    return SimpleNamespace(trainer=SimpleNamespace(run_dir=str(tmp_path / "run")))


def test_ctrl_c_kills_the_workers_without_asking_and_says_where(monkeypatch, trainer_cfg, capsys):
    from fipo_trainer.trainer import loop

    shutdowns = []

    def fit(self):
        raise WaitInterrupted("while waiting 3s for worker group 'rollout': rank 0 in generate")

    def shutdown(self, *, graceful=True):
        shutdowns.append(graceful)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while the workers are killed
        time.sleep(0.05)

    monkeypatch.setattr(loop.RLTrainer, "fit", fit)
    monkeypatch.setattr(loop.RLTrainer, "shutdown", shutdown)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(loop.TrainingInterrupted) as info:
        loop.run_training(trainer_cfg)
    assert shutdowns == [False]
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the cleanup
    assert isinstance(info.value, KeyboardInterrupt)
    err = capsys.readouterr().err
    assert "fipo-train: interrupted (Ctrl-C) while waiting 3s for worker group 'rollout'" in err
    assert "workers stopped in" in err and str(info.value) in err
    assert err.index("Ctrl-C: stopping the workers") < err.index("interrupted (Ctrl-C)")


def test_a_failed_run_kills_its_workers_and_a_finished_one_stops_them(monkeypatch, trainer_cfg):
    from fipo_trainer.trainer import loop

    shutdowns = []
    monkeypatch.setattr(
        loop.RLTrainer, "shutdown", lambda self, *, graceful=True: shutdowns.append(graceful)
    )

    def stalled(self):
        raise CallTimeoutError("worker group 'rollout': rank 0 did not finish generate_batch")

    monkeypatch.setattr(loop.RLTrainer, "fit", stalled)
    with pytest.raises(CallTimeoutError):
        loop.run_training(trainer_cfg)
    assert shutdowns == [False]
    monkeypatch.setattr(loop, "print_summary", lambda result: None)
    monkeypatch.setattr(loop.RLTrainer, "fit", lambda self: "result")
    monkeypatch.setattr(loop.RLTrainer, "plot", lambda self, result: shutdowns.append("plot"))
    assert loop.run_training(trainer_cfg) == "result"
    assert shutdowns == [False, True, "plot"]  # the curves are drawn after the workers stop


# --------------------------------------------------------------------------- reaping


def test_reap_kills_a_stopped_worker_at_once_a_running_one_after_its_grace_and_no_other():
    import subprocess
    import sys

    from fipo_trainer.cluster.reap import LocalProcess, reap

    code = "import time; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code])
    other = subprocess.Popen([sys.executable, "-c", code])
    try:
        os.kill(child.pid, signal.SIGSTOP)  # ignores everything but SIGKILL
        started = psutil_create_time(child.pid)
        title = sys.executable
        assert LocalProcess(child.pid, started, title).running()
        # psutil can read one process's start 1.0 s apart (a slewed clock): still that process
        assert LocalProcess(child.pid, started - 1.0, title).running()
        # a reused pid (other start time) or another program (other title) is left alone
        assert not LocalProcess(other.pid, started - 100, title).running()
        assert not LocalProcess(other.pid, psutil_create_time(other.pid), "ray::X").running()
        waited = time.monotonic() + 10.0  # the stop takes effect once the child runs
        while not LocalProcess(child.pid, started, title).stopped():
            assert time.monotonic() < waited, "SIGSTOP did not stop the child"
            time.sleep(0.05)
        assert not LocalProcess(other.pid, psutil_create_time(other.pid), title).stopped()
        # stopped, it cannot exit on its own: killed at once, not after the grace
        begin = time.monotonic()
        assert reap([LocalProcess(child.pid, started, title)], grace_s=30.0) == [child.pid]
        assert time.monotonic() - begin < 5.0
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert other.poll() is None
        # a running one gets its grace, then SIGKILL
        begin = time.monotonic()
        other_proc = LocalProcess(other.pid, psutil_create_time(other.pid), title)
        assert reap([other_proc], grace_s=0.5) == [other.pid]
        assert time.monotonic() - begin >= 0.5
        assert other.wait(timeout=5) == -signal.SIGKILL
        assert reap([LocalProcess(child.pid, started, title)], grace_s=0.3) == []
    finally:
        for proc in (child, other):
            proc.kill()
            proc.wait()


def psutil_create_time(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()
