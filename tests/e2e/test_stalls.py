"""A worker that stops answering (``kill -STOP``, not dead) is named within its deadline, and
Ctrl-C stops a run and its workers within 10 s (issue 12 item 1).

The first tests use a tiny Ray actor (``integration``); the last two run the quickstart
(``e2e``): in-process with the rollout worker stopped at the first generate, and
``fipo-train`` as a subprocess that gets Ctrl-C while its rollout worker is stopped.
Run them under ``flock /tmp/heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray

from fipo_trainer.cluster import Worker, WorkerCallError, WorkerGroup, init_ray
from fipo_trainer.cluster.waiting import CallTimeoutError, Deadline
from tests.e2e.test_train import SHORT_RUN as TRAIN_SHORT_RUN

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parents[2]
FIPO_TRAIN = Path(sys.executable).with_name("fipo-train")
SHORT_RUN = [*TRAIN_SHORT_RUN, "trainer.loggers=[console,jsonl]"]


class NapWorker(Worker):
    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    init_ray(num_cpus=2)  # reused by the in-process training run below
    yield


def text_after(path: Path, offset: int, text: str, seconds: float) -> str:
    """What ``path`` holds past byte ``offset`` once that holds ``text`` (or after ``seconds``).
    Take ``offset`` before the signal: the driver may answer before the file is read again."""
    deadline = time.monotonic() + seconds
    while text not in (new := path.read_bytes()[offset:].decode(errors="replace")):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return new


def threads_of(pid: int) -> str:
    """Each thread's state and kernel wait channel: where a process that answers no signal is
    (stopped, ``T``; in uninterruptible sleep, ``D``)."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            name = (task / "comm").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            lines.append(f"  {task.name} {name}: {state} {(task / 'wchan').read_text()}")
    return f"pid {pid} threads:\n" + "\n".join(lines)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or a reused pid of another program does not count)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "ray::" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def release(pids: list[int]) -> None:
    """Never leave a stopped process behind, whatever the test did."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- one actor


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_slow_call_fails_at_its_deadline_naming_rank_call_and_key(ray_cluster):
    group = WorkerGroup(
        NapWorker,
        1,
        name="nappers",
        num_cpus_per_worker=0.25,
        deadline=Deadline(3.0, "trainer.call_timeout_s"),
    )
    try:
        start = time.monotonic()
        with pytest.raises(CallTimeoutError) as info:
            group.call_all(NapWorker.nap, 60.0)
        assert 3.0 <= time.monotonic() - start < 10.0
        err = info.value
        assert (err.role, err.ranks, err.method) == ("nappers", [0], "nap")
        assert err.key == "trainer.call_timeout_s" and err.elapsed_s >= 3.0
        assert str(err).startswith("worker group 'nappers': rank 0 did not finish nap within 3s")
        assert "raise trainer.call_timeout_s" in str(err)
        # where the stalled rank is: its stacks, printed on SIGUSR1 into its Ray log, the main
        # thread (which runs the call) first, wherever the signal landed
        here = f"worker group 'nappers' rank 0 (pid {group.worker_info[0]['pid']}) is here:\n"
        assert here in str(err), str(err)
        first_thread = str(err).split(here, 1)[1].split("\n\n", 1)[0]
        assert re.search(r'File ".*test_stalls\.py", line \d+ in nap', first_thread), str(err)
        # a call of its own deadline
        with pytest.raises(CallTimeoutError, match=r"raise my\.key"):
            group.call_all(NapWorker.nap, 0.0, deadline=Deadline(1.0, "my.key"))
    finally:
        group.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_stopped_rank_is_named_and_shutdown_removes_it(ray_cluster):
    group = WorkerGroup(NapWorker, 2, name="stopped", num_cpus_per_worker=0.25)
    pids = [info["pid"] for info in group.worker_info]
    try:
        os.kill(pids[1], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(CallTimeoutError) as info:
            group.call_all(NapWorker.nap, 0.0, deadline=Deadline(3.0, "trainer.call_timeout_s"))
        assert time.monotonic() - start < 10.0
        assert (info.value.role, info.value.ranks) == ("stopped", [1])
        assert "'stopped': rank 1 did not finish nap" in str(info.value)
        group.shutdown()
        assert gone_within(pids, 15.0), "a stopped worker survived WorkerGroup.shutdown()"
    finally:
        release(pids)
        group.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_dead_rank_is_still_named_within_seconds(ray_cluster):
    group = WorkerGroup(NapWorker, 1, name="dying", num_cpus_per_worker=0.25)
    pid = group.worker_info[0]["pid"]
    try:
        refs = group.submit(NapWorker.nap, 60.0)
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        from fipo_trainer.cluster.waiting import wait_labelled

        with pytest.raises(WorkerCallError, match=r"'dying': rank 0 died during nap"):
            wait_labelled(refs, what="nap", timeout_s=120.0)
        assert time.monotonic() - start < 20.0
    finally:
        release([pid])
        group.shutdown()


# --------------------------------------------------------------------------- training


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_a_stalled_rollout_worker_fails_the_run_within_its_deadline(
    ray_cluster, tmp_path, monkeypatch
):
    """The rollout worker is stopped at the first generate: the run fails after the derived
    deadline (a 10 s floor here; the quickstart's default is 120 s) naming role, rank, call
    and the key, and the stopped worker is killed on the way out."""
    from fipo_trainer.cli import compose_config
    from fipo_trainer.rollout.group import RolloutGroup
    from fipo_trainer.trainer.config import prepare_config
    from fipo_trainer.trainer.loop import run_training

    stopped: dict[str, float | int] = {}
    original = RolloutGroup.generate_stream  # what training and validation generate with

    def generate_stream(self, *args, **kwargs):
        if not stopped:
            stopped["pid"] = self.worker_group.worker_info[0]["pid"]
            os.kill(int(stopped["pid"]), signal.SIGSTOP)
            stopped["at"] = time.monotonic()
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(RolloutGroup, "generate_stream", generate_stream)
    cfg = prepare_config(
        compose_config(
            [
                *SHORT_RUN,
                f"trainer.run_dir={tmp_path / 'run'}",
                "rollout.generate_timeout_floor_s=10",
            ]
        )
    )
    try:
        with pytest.raises(CallTimeoutError) as info:
            run_training(cfg)
        took = time.monotonic() - float(stopped["at"])
        assert 10.0 <= took < 10.0 + 25.0, f"failed {took:.0f}s after the stop"
        err = info.value
        assert (err.role, err.ranks, err.method) == ("rollout", [0], "generate_stream")
        assert err.key == "rollout.generate_timeout_s" and err.elapsed_s >= 10.0
        msg = str(err)
        assert "worker group 'rollout': rank 0 did not finish generate_stream within 10s" in msg
        assert "raise rollout.generate_timeout_s" in msg
        assert "rollout.generate_timeout_floor_s=10" in msg
        assert gone_within([int(stopped["pid"])], 15.0), "the stopped rollout worker survived"
    finally:
        if stopped:
            release([int(stopped["pid"])])


def run_processes(marker: str) -> list[psutil.Process]:
    """Every live process started for the run that carries ``marker`` in its environment."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if (
                proc.pid != os.getpid()
                and proc.environ().get("FIPO_STALL_TEST_RUN") == marker
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{proc.pid} {proc.status()} {' '.join(proc.cmdline())[:120]}")
    return out


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_ctrl_c_stops_fipo_train_and_its_workers_within_10s(tmp_path):
    """Ctrl-C (SIGINT to fipo-train's process group, as a terminal sends it) while the
    rollout worker is stopped: fipo-train exits within 10 s with a clear message and none of
    the run's processes (Ray workers, reward pool) remain."""
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    args = [
        str(FIPO_TRAIN),
        *SHORT_RUN,
        "trainer.total_training_steps=50",
        "rollout.engines_per_worker=1",  # one engine process to stop (a fork shares its title)
        f"trainer.run_dir={run_dir}",
    ]
    env = {**os.environ, "FIPO_STALL_TEST_RUN": marker}
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, f"fipo-train exited early:\n{err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.5)
        rollout = [p for p in run_processes(marker) if "RolloutWorker" in " ".join(p.cmdline())]
        assert len(rollout) == 1, describe(run_processes(marker))
        rollout[0].send_signal(signal.SIGSTOP)
        time.sleep(3.0)  # step 2 now waits for the stopped worker
        # SIGUSR1 prints where the driver is and the run goes on: waiting for the engine.
        offset = err.stat().st_size
        os.kill(proc.pid, signal.SIGUSR1)
        stacks = text_after(err, offset, "next_ready_stream", 10.0)
        assert proc.poll() is None, f"exit {proc.returncode}:\n{err.read_text()[-4000:]}"
        assert "next_ready_stream" in stacks, f"{threads_of(proc.pid)}\n{stacks[-4000:]}"
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=10.0 + 5.0)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGUSR1)  # where it hangs, for the report
            time.sleep(2.0)
            pytest.fail(
                f"fipo-train still running 15 s after Ctrl-C:\n{err.read_text()[-8000:]}\n"
                f"{threads_of(proc.pid)}\nrun processes: {describe(run_processes(marker))}"
            )
        took = time.monotonic() - start
        stderr_text = err.read_text()
        assert took < 10.0 + 2.0, f"fipo-train took {took:.1f}s to stop"
        assert proc.returncode == 130  # as a shell reports a Ctrl-C'd process
        assert "fipo-train: interrupted (Ctrl-C)" in stderr_text, stderr_text[-3000:]
        assert "Traceback" not in stderr_text, stderr_text[-3000:]
        assert "workers stopped in" in stderr_text
        said = stderr_text.index("fipo-train: Ctrl-C: stopping the workers")  # at once
        assert said < stderr_text.index("fipo-train: interrupted (Ctrl-C)")
        wait_until = time.monotonic() + 5.0
        while run_processes(marker) and time.monotonic() < wait_until:
            time.sleep(0.2)
        left = run_processes(marker)
        assert not left, f"processes of the run remain: {describe(left)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in run_processes(marker):
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)
                p.kill()
