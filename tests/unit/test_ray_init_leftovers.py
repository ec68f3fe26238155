"""The run directory's Ray session record (issue 12 item 8), without Ray: a stand-in
"leftover" is a ``sleep`` process."""

from __future__ import annotations

import json
import logging
import subprocess
import time

import psutil
import pytest

from fipo_trainer.cluster import leftovers
from fipo_trainer.cluster.leftovers import ProcessEntry, SessionRecord


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def _gone_driver() -> ProcessEntry:
    done = subprocess.Popen(["true"])
    done.wait()
    return ProcessEntry(pid=done.pid, name="python", create_time=time.time() - 5)


def _record(run_dir, driver: ProcessEntry, procs: list[psutil.Process]) -> SessionRecord:
    record = SessionRecord(
        driver=driver,
        session_dir="/tmp/ray/session_test",
        gcs_address="127.0.0.1:6379",
        node_ip="127.0.0.1",
        started_at=time.time() - 60,
        processes=[ProcessEntry.of(p) for p in procs],
    )
    leftovers.record_path(run_dir).write_text(record.to_json())
    return record


def test_a_killed_runs_processes_are_reported_with_a_kill_command(tmp_path, sleeper, caplog):
    _record(tmp_path, _gone_driver(), [psutil.Process(sleeper.pid)])
    caplog.set_level(logging.WARNING, logger="fipo_trainer")
    assert leftovers.report_leftovers(tmp_path) == [sleeper.pid]
    text = caplog.text
    assert f"kill {sleeper.pid}" in text and "/tmp/ray/session_test" in text
    assert "ray stop" in text  # and why it is not the advice
    assert leftovers.record_path(tmp_path).exists()  # still there until they are gone

    sleeper.kill()
    sleeper.wait()
    caplog.clear()
    assert leftovers.report_leftovers(tmp_path) == []
    assert not caplog.text  # a stale record is dropped silently
    assert not leftovers.record_path(tmp_path).exists()


def test_a_reused_pid_is_not_a_leftover(tmp_path, sleeper):
    entry = ProcessEntry.of(psutil.Process(sleeper.pid))
    assert entry.running() is not None
    assert ProcessEntry(entry.pid, entry.name, entry.create_time - 100).running() is None


def test_a_boot_time_that_ticked_over_is_still_the_same_process(sleeper):
    """psutil's start time = boot time (whole seconds) + ticks since boot: a slewed clock can
    move the boot time by one second between the record and the check."""
    entry = ProcessEntry.of(psutil.Process(sleeper.pid))
    for shift in (-1.0, 1.0):
        assert ProcessEntry(entry.pid, entry.name, entry.create_time + shift).running() is not None


def test_another_live_driver_in_the_same_run_dir_is_reported(tmp_path, sleeper, caplog):
    _record(tmp_path, ProcessEntry.of(psutil.Process(sleeper.pid)), [])
    caplog.set_level(logging.WARNING, logger="fipo_trainer")
    assert leftovers.report_leftovers(tmp_path) == []
    assert f"running driver (pid {sleeper.pid}" in caplog.text


def test_own_record_is_not_reported_and_is_removed_by_its_writer(tmp_path, sleeper, caplog):
    path = leftovers.write_record(
        tmp_path,
        session_dir="/tmp/ray/s",
        gcs_address="127.0.0.1:1",
        node_ip="127.0.0.1",
        processes=[psutil.Process(sleeper.pid)],
    )
    raw = json.loads(path.read_text())
    assert raw["processes"][0]["pid"] == sleeper.pid and raw["driver"]["pid"] == psutil.Process().pid
    caplog.set_level(logging.WARNING, logger="fipo_trainer")
    assert leftovers.report_leftovers(tmp_path) == []
    assert not caplog.text
    assert leftovers.remove_record(tmp_path)
    assert not path.exists()


def test_someone_elses_record_is_kept_by_remove(tmp_path, sleeper):
    _record(tmp_path, _gone_driver(), [psutil.Process(sleeper.pid)])
    assert not leftovers.remove_record(tmp_path)
    assert leftovers.record_path(tmp_path).exists()


def test_an_unreadable_record_is_ignored(tmp_path, caplog):
    leftovers.record_path(tmp_path).write_text("{not json")
    caplog.set_level(logging.WARNING, logger="fipo_trainer")
    assert leftovers.report_leftovers(tmp_path) == []
    assert "unreadable Ray session record" in caplog.text


def test_session_processes_are_the_drivers_descendants(sleeper):
    assert sleeper.pid in {p.pid for p in leftovers.session_processes()}
