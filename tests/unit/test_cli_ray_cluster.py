"""scripts/ray_cluster.sh: the commands it runs (PRINT_ONLY=1 prints them instead)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ray_cluster.sh"


def script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRINT_ONLY": "1", "RAY_PORT": "6380"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30
    )


def printed(*args: str) -> list[str]:
    res = script(*args)
    assert res.returncode == 0, res.stderr
    return shlex.split(res.stdout)


def test_head_worker_and_launch_commands():
    assert printed("head", "--num-gpus", "8")[:4] == ["ray", "start", "--head", "--port=6380"]
    assert "--num-gpus" in printed("head", "--num-gpus", "8")
    assert printed("worker", "10.0.0.1")[:3] == ["ray", "start", "--address=10.0.0.1:6380"]
    assert printed("worker", "10.0.0.1:7000")[2] == "--address=10.0.0.1:7000"
    assert printed("launch", "fipo_qwen2.5_32b_aime24", "model.path=/m") == [
        "fipo-train",
        "recipe=fipo_qwen2.5_32b_aime24",
        "resources.ray_address=auto",
        "model.path=/m",
    ]
    submitted = printed("submit", "quickstart_cpu")
    assert submitted[:3] == ["ray", "job", "submit"]
    assert submitted[submitted.index("--") + 1 :] == [
        "fipo-train",
        "recipe=quickstart_cpu",
        "resources.ray_address=auto",
    ]


def test_usage_and_errors():
    assert "Usage:" in script("--help").stdout
    for args in ((), ("worker",), ("launch",), ("bogus",)):
        res = script(*args)
        assert res.returncode == 2 and "Usage:" in res.stderr


def test_dashboard_listens_on_loopback_unless_told_and_never_on_every_interface():
    head = printed("head")
    assert "--dashboard-host=127.0.0.1" in head
    submitted = printed("submit", "quickstart_cpu")
    assert "--address=http://127.0.0.1:8265" in submitted
    for wildcard in ("0.0.0.0", "::"):
        res = subprocess.run(
            ["bash", str(SCRIPT), "head"],
            capture_output=True,
            text=True,
            env={**os.environ, "PRINT_ONLY": "1", "DASHBOARD_HOST": wildcard},
            timeout=30,
        )
        assert res.returncode == 2 and "every interface" in res.stderr
