"""The timeline's Ray side on a real local Ray: this job's calls come back as Chrome-trace
events, and a GCS that stops answering costs the deadline, not the run's shut-down."""

from __future__ import annotations

import sys
import time

import psutil
import pytest
import ray

from fipo_trainer.cluster import init_ray, shutdown_ray
from fipo_trainer.trainer.timeline import ray_events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=0)
class Echo:
    def ping(self, value: int) -> int:
        return value


def _gcs_server() -> psutil.Process:
    procs = psutil.Process().children(recursive=True)
    (gcs,) = [p for p in procs if "gcs_server" in " ".join(p.cmdline())]
    return gcs


def test_this_jobs_calls_and_a_deadline_when_the_gcs_stops_answering():
    init_ray(num_cpus=1)
    try:
        echo = Echo.remote()
        assert ray.get([echo.ping.remote(i) for i in range(3)]) == [0, 1, 2]
        events = ray_events(60)
        pings = [e for e in events if e.get("cat") == "task::Echo.ping"]
        assert len(pings) == 3 and all(e["ph"] == "X" and e["dur"] > 0 for e in pings)
        gcs = _gcs_server()
        gcs.suspend()  # SIGSTOP: alive, never answering
        try:
            start = time.monotonic()
            with pytest.raises(TimeoutError, match="no answer within 3 s"):
                ray_events(3)
            assert time.monotonic() - start < 6
        finally:
            gcs.resume()
    finally:
        shutdown_ray()
