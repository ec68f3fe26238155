"""A local Ray start is lean: no autoscaler monitor, no dashboard server; the run still works.

Each case starts Ray in a driver process of its own (this test's Ray state stays untouched),
runs an actor that reads the job's env, and reports the processes Ray started, the head's
methods after the start, and what is left after ``ray.shutdown``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DRIVER = """
import json, sys, time, psutil, ray
from ray._private.node import Node
from fipo_trainer.cluster.ray_init import LEAN_HEAD_SKIPS, init_ray
methods = {name: getattr(Node, name) for name in LEAN_HEAD_SKIPS}
init_ray(None, 1, lean_head=sys.argv[1] == "lean",
         runtime_env={"env_vars": {"FIPO_LEAN_PROBE": "seen"}})

@ray.remote(num_cpus=0.1)
class Probe:
    def env(self):
        import os
        return os.environ.get("FIPO_LEAN_PROBE")

seen = ray.get(Probe.remote().env.remote(), timeout=120)
cmdlines = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
restored = all(getattr(Node, n) is m for n, m in methods.items())
ray.shutdown()
time.sleep(1)
left = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
print("RESULT", json.dumps({"seen": seen, "cmdlines": cmdlines, "restored": restored,
                            "left": left}))
"""


def _start(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    res = subprocess.run(
        [sys.executable, "-c", DRIVER, mode], env=env, capture_output=True, text=True, timeout=240
    )
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, res.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


def _has(cmdlines: list[str], script: str) -> bool:
    return any(script in c for c in cmdlines)


@pytest.mark.parametrize("mode", ["lean", "full"])
def test_a_local_head_starts_without_monitor_and_dashboard_unless_asked(mode: str) -> None:
    result = _start(mode)
    cmdlines = result["cmdlines"]
    assert result["seen"] == "seen"  # the runtime env (its agent) still reaches the workers
    assert _has(cmdlines, "gcs_server") and _has(cmdlines, "raylet"), cmdlines
    assert _has(cmdlines, "log_monitor.py"), cmdlines  # workers' output still reaches us
    lean = mode == "lean"
    assert _has(cmdlines, "autoscaler/_private/monitor.py") is not lean, cmdlines
    assert _has(cmdlines, "dashboard/dashboard.py") is not lean, cmdlines
    assert result["restored"], "Ray's Node methods were not put back after the start"
    assert result["left"] == [], result["left"]
