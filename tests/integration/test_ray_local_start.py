"""A local Ray start that fails is cleaned up, tried again, and then named with its logs.

Ray gives a new raylet a fixed 30 s to register with its GCS; CI once missed it under load.
Here the start fails for sure: ``RAY_GCS_SERVER_PORT`` points the local GCS at a port this
test holds. The driver runs in its own process, so this test's Ray state stays untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

DRIVER = """
import json, logging, psutil
logging.basicConfig(level=logging.WARNING)
from fipo_trainer.cluster.ray_init import init_ray
try:
    init_ray(None, 1)
    print("RESULT", json.dumps({"started": True}))
except RuntimeError as err:
    left = [" ".join(p.cmdline()[:1]) for p in psutil.Process().children(recursive=True)]
    print("RESULT", json.dumps({"started": False, "error": str(err), "children": left}))
"""


def test_a_local_start_that_fails_is_retried_clean_then_named() -> None:
    # short: Ray's socket paths under it must stay within the 107-byte limit
    tmp_path = Path(tempfile.mkdtemp(prefix="rls", dir="/tmp"))
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_GCS_SERVER_PORT=str(port), RAY_TMPDIR=str(tmp_path))
    try:
        res = subprocess.run(
            [sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=360
        )
    finally:
        squatter.close()
        shutil.rmtree(tmp_path, ignore_errors=True)
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert not result["started"], res.stderr[-2000:]
    # the first failure was retried after cleaning up, and the retry met the same cause
    assert "did not start (attempt 1 of 2" in res.stderr, res.stderr[-2000:]
    assert result["error"].startswith("Ray could not start its local node (2 attempts)")
    assert "Failed to start GCS" in result["error"]
    assert f"{tmp_path}/ray/session_latest/logs" in result["error"], result["error"]
    assert "load average" in result["error"] and "resources.ray_address" in result["error"]
    assert result["children"] == [], "a failed start left its servers running"


def test_cleanup_kills_only_the_new_processes_run_from_ray() -> None:
    """What a failed start leaves while its GCS lives (the 30 s timeout case): Ray's servers
    are killed, the caller's own children are not."""
    import ray

    from fipo_trainer.cluster.ray_init import _kill_new_children

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    mine_before = subprocess.Popen([*sleeper, str(Path(ray.__file__).parent)])
    before = {mine_before.pid}
    rays = subprocess.Popen([*sleeper, str(Path(ray.__file__).parent / "core/src/ray/gcs")])
    mine = subprocess.Popen(sleeper)
    try:
        _kill_new_children(before, grace_s=5.0)
        assert rays.wait(timeout=10) is not None
        assert mine.poll() is None and mine_before.poll() is None
    finally:
        for proc in (mine_before, rays, mine):
            proc.kill()
            proc.wait()


def test_joining_a_cluster_that_is_not_there_names_the_key_and_the_fix(tmp_path):
    """``resources.ray_address=auto`` with no Ray running: Ray's ConnectionError arrives as
    ``RayUnreachable`` naming the key and the two ways out (``fipo-train`` prints it as one
    line). Ray looks for a running cluster in its temp dir, here an empty one."""
    driver = (
        "from fipo_trainer.cluster.ray_init import RayUnreachable, init_ray\n"
        "try:\n"
        "    init_ray('auto')\n"
        "except RayUnreachable as err:\n"
        "    print('RESULT', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=120
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), "")
    assert "resources.ray_address='auto': no Ray cluster answered" in line, out.stderr[-2000:]
    assert "scripts/ray_cluster.sh head" in line and "leave resources.ray_address unset" in line
