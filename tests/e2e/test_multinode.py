"""Multi-node on an existing Ray cluster, for real (issue 12): a two-node Ray cluster on this
machine (a head and a second ``ray start --address`` node, each with its own custom resource),
``scripts/ray_cluster.sh launch`` and ``submit`` of a 3-step quickstart, the actor ranks pinned
to one node and the rollout worker to the other. Where each role ran is read from Ray's state
API; only the cluster this test started is stopped (by pid, never ``ray stop``).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.layouts import TWO_RANKS
from tests.helpers.ray_nodes import SCRIPT, RayNodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ACTOR_NODE, ROLLOUT_NODE = "fipo_node_actor", "fipo_node_rollout"
RUN = [
    *TWO_RANKS,  # two actor ranks fill the actor node
    "trainer.total_training_steps=3",
    "trainer.test_freq=0",
    "trainer.val_before_train=false",
    "trainer.plot=false",
    "trainer.export_hf=false",
    "trainer.rollout_dump_freq=0",
    "trainer.loggers=[console,jsonl]",
    "algorithm.filter_groups.on_exhausted=proceed",
    # pin each role to its node by the custom resource that node was started with
    f"resources.actor_bundle_resources={{{ACTOR_NODE}: 1}}",
    f"resources.rollout_bundle_resources={{{ROLLOUT_NODE}: 1}}",
]
ROLES = {"DeepSpeedActorWorker": ACTOR_NODE, "RolloutWorker": ROLLOUT_NODE}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayNodes]:
    nodes = RayNodes()
    patch = pytest.MonkeyPatch()
    # this process asks the cluster's state and job APIs: with the token, as the script does
    patch.setenv("RAY_AUTH_MODE", "token")
    try:
        # One CPU per node: the two actor ranks (0.5 each) fill a node. The actor goes to the
        # joined node, not the head where the driver runs, which Ray prefers when free to.
        nodes.start_head({ROLLOUT_NODE: 2}, num_cpus=1)
        nodes.add_worker({ACTOR_NODE: 2}, num_cpus=1)
        _wait_for_nodes(nodes, 2)
        yield nodes
    finally:
        patch.undo()
        nodes.stop()
        assert not nodes.processes(), "the test's Ray cluster outlived stop()"


def _state(nodes: RayNodes):
    from ray.util import state

    return state, f"http://127.0.0.1:{nodes.dashboard_port}"


def _wait_for_nodes(nodes: RayNodes, count: int, timeout_s: float = 120.0) -> None:
    state, api = _state(nodes)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            alive = [n for n in state.list_nodes(address=api) if n.state == "ALIVE"]
            if len(alive) >= count:
                return
        except Exception:  # the dashboard's API server is still starting
            alive = []
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(alive)} of {count} nodes alive:\n" + "\n".join(nodes.log))
        time.sleep(1.0)


def _actors(nodes: RayNodes) -> dict[str, tuple[str, str]]:
    """actor id -> (class name, node id) for every actor the cluster has seen."""
    state, api = _state(nodes)
    return {
        a.actor_id: (a.class_name, a.node_id) for a in state.list_actors(address=api, limit=1000)
    }


def _node_of_resource(nodes: RayNodes) -> dict[str, str]:
    """custom resource -> the node id that has it."""
    state, api = _state(nodes)
    found = {}
    for node in state.list_nodes(address=api, detail=True):
        for name in (ACTOR_NODE, ROLLOUT_NODE):
            if name in (node.resources_total or {}):
                found[name] = node.node_id
    return found


def _assert_placed(nodes: RayNodes, before: dict[str, tuple[str, str]]) -> None:
    """The run's new workers: 2 actor ranks on the actor node, 1 rollout worker on the other."""
    new = {k: v for k, v in _actors(nodes).items() if k not in before}
    where = _node_of_resource(nodes)
    assert where[ACTOR_NODE] != where[ROLLOUT_NODE]
    seen: dict[str, list[str]] = {}
    for cls, node in new.values():
        if cls in ROLES:
            seen.setdefault(cls, []).append(node)
    assert len(seen.get("DeepSpeedActorWorker", [])) == 2, new
    assert len(seen.get("RolloutWorker", [])) == 1, new
    for cls, placed in seen.items():
        assert set(placed) == {where[ROLES[cls]]}, (cls, placed, where)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_launch_places_actor_and_rollout_on_their_nodes(cluster, tmp_path):
    before = _actors(cluster)
    run_dir = tmp_path / "launch"
    res = subprocess.run(
        ["bash", str(SCRIPT), "launch", "quickstart_cpu", *RUN, f"trainer.run_dir={run_dir}"],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert max(_steps(run_dir)) == 3
    # a joined cluster is not the run's: no local session record, the cluster still up
    assert not (run_dir / "ray_session.json").exists()
    _assert_placed(cluster, before)


def test_submitted_job_places_actor_and_rollout_on_their_nodes(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    before = _actors(cluster)
    run_dir = tmp_path / "submit"
    res = subprocess.run(
        ["bash", str(SCRIPT), "submit", "quickstart_cpu", *RUN, f"trainer.run_dir={run_dir}"],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    match = re.search(r"raysubmit_\w+", res.stdout + res.stderr)
    assert match, res.stdout + res.stderr
    client = JobSubmissionClient(f"http://127.0.0.1:{cluster.dashboard_port}")
    deadline = time.monotonic() + 600
    status = client.get_job_status(match.group(0))
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "the submitted job did not finish in 600 s"
        time.sleep(2.0)
        status = client.get_job_status(match.group(0))
    logs = client.get_job_logs(match.group(0))
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert max(_steps(run_dir)) == 3
    _assert_placed(cluster, before)
