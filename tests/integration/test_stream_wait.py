"""``next_ready_stream`` (cluster/waiting.py) on a real local Ray: the driver's wait for a
TP engine's streamed parts also watches the engine's other ranks.

Only TP rank 0 streams its responses; ranks > 0 run the same steps and their results were
awaited only once every stream had ended. A rank > 0 that died left rank 0 waiting in the
engine's collectives until the generation deadline (hours for the paper's recipes), and the
error then blamed rank 0.
"""

from __future__ import annotations

import time

import pytest
import ray

from fipo_trainer.cluster import init_ray, shutdown_ray
from fipo_trainer.cluster.waiting import Deadline, WorkerCallError, next_ready_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@ray.remote
def _parts(count: int, every_s: float):
    for i in range(count):
        time.sleep(every_s)
        yield i


@ray.remote
def _rank(fail_after_s: float | None, done_after_s: float = 0.1) -> str:
    if fail_after_s is not None:
        time.sleep(fail_after_s)
        raise RuntimeError("rank 1 lost its device")
    time.sleep(done_after_s)
    return "done"


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=2)
    yield
    shutdown_ray()


def _drain(stream, others) -> list[int]:
    got, start = [], time.monotonic()
    streams = {stream: "rollout rank 0"}
    while streams:
        gen = next_ready_stream(streams, others, start, Deadline(60.0, "rollout.generate_timeout_s"))
        try:
            got.append(ray.get(next(gen)))
        except StopIteration:
            del streams[gen]
    return got


def test_a_failing_tp_rank_is_raised_while_rank_0_still_streams(local_ray):
    stream = _parts.options(num_returns="streaming").remote(30, 0.5)  # 15 s of parts
    others = [("rollout rank 1", _rank.remote(1.0))]
    start = time.monotonic()
    with pytest.raises(WorkerCallError, match=r"rollout rank 1 .*generate_batch(.|\n)*lost its device"):
        _drain(stream, others)
    assert time.monotonic() - start < 5.0  # not after the stream's 15 s (or the deadline)
    ray.cancel(stream)


def test_ranks_that_end_before_the_stream_are_dropped_and_the_parts_all_arrive(local_ray):
    stream = _parts.options(num_returns="streaming").remote(4, 0.6)
    others = [("rollout rank 1", _rank.remote(None)), ("rollout rank 2", _rank.remote(None, 30))]
    assert _drain(stream, others) == [0, 1, 2, 3]
    assert [label for label, _ in others] == ["rollout rank 2"]  # still running: awaited later


def test_a_wait_with_a_limit_gives_none_when_no_part_comes_in_time(local_ray):
    """The driver looks at the verdicts of what arrived between parts (``wait_s``, the
    sampler's ticks) instead of sitting in one wait until the next part."""
    stream = _parts.options(num_returns="streaming").remote(1, 0.5)
    streams, start = {stream: "rollout rank 0"}, time.monotonic()
    deadline = Deadline(60.0, "rollout.generate_timeout_s")
    t = time.monotonic()
    assert next_ready_stream(streams, [], start, deadline, wait_s=0.05) is None
    assert 0.04 <= time.monotonic() - t < 0.4
    assert next_ready_stream(streams, [], start, deadline, wait_s=5.0) is stream
    assert time.monotonic() - t < 2.0
    assert ray.get(next(stream)) == 0
