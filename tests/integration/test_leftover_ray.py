"""Orphans (issue 12 item 8): a SIGKILLed driver's local Ray leaves processes behind; the
next start in the same run directory names them (and how to stop them)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fipo_trainer.cluster import leftovers
from fipo_trainer.cluster.ray_init import init_ray, shutdown_ray

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

_DRIVER = """
import sys, time
from fipo_trainer.cluster.ray_init import init_ray
init_ray(None, 1, run_dir=sys.argv[1])
print("READY", flush=True)
time.sleep(600)
"""


def _wait_ready(out_file, proc, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "READY" in out_file.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"driver exited with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError("driver did not start Ray in time")


def test_sigkilled_drivers_leftover_ray_is_reported_at_the_next_start(tmp_path, caplog):
    run_dir = tmp_path / "run"
    out = tmp_path / "driver.log"
    record: leftovers.SessionRecord | None = None
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, str(run_dir)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(out, proc)
        record = leftovers.read_record(run_dir)
        assert record is not None and record.driver.pid == proc.pid
        assert record.node_ip == "127.0.0.1"
        titles = {e.name for e in record.processes}
        assert {"gcs_server", "raylet"} <= titles, titles

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        time.sleep(2)  # the GCS and raylet die with their driver; the agents do not
        lingering = {p.pid for p in leftovers.running_leftovers(record)}
        assert lingering, "nothing of the killed run's Ray lingered"

        shutdown_ray()  # this process: a fresh local start, in the same run directory
        caplog.set_level(logging.WARNING, logger="fipo_trainer")
        init_ray(None, 1, run_dir=run_dir)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        report = next((m for m in warnings if "left" in m and "kill" in m), None)
        assert report is not None, warnings
        still = {p.pid for p in leftovers.running_leftovers(record)}
        assert still, "the leftovers exited during the start; the report could not be checked"
        for pid in still:
            assert str(pid) in report, (pid, report)
        assert f"driver pid {proc.pid}" in report and record.session_dir in report

        own = leftovers.read_record(run_dir)
        assert own is not None and own.driver.pid == os.getpid()
        shutdown_ray()
        assert not leftovers.record_path(run_dir).exists()  # a clean shutdown removes it
    finally:
        shutdown_ray()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if record is not None:  # the test's own leftovers: stop exactly those
            for alive in leftovers.running_leftovers(record):
                with contextlib.suppress(psutil.Error):
                    alive.kill()
