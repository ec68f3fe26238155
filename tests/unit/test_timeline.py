"""The run timeline (trainer/timeline.py, timeline_plot.py): the driver's stages recorded by
``timed`` while a timeline is on, Ray's remote calls in lanes, the window of steps drawn."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fipo_trainer.trainer import timeline_plot
from fipo_trainer.trainer.plot import main as plot_main
from fipo_trainer.trainer.step_metrics import timed
from fipo_trainer.trainer.timeline import (
    STAGE_SPANS,
    RunTimeline,
    call_with_deadline,
    driver_events,
    own_job,
)
from fipo_trainer.trainer.timeline_plot import (
    Lane,
    default_window,
    describe,
    idle_by_role,
    load_lanes,
    parse_window,
    plot_timeline,
    stage_group,
)

T0 = 1_800_000_000.0  # epoch seconds of the synthetic trace's first event


def ray_call(cls: str, method: str, tid: str, start: float, seconds: float) -> dict:
    """One remote call as ``ray.timeline()`` lists it (microseconds)."""
    return {"cat": f"task::{cls}.{method}", "name": method, "pid": "127.0.0.1", "tid": tid,
            "ts": (T0 + start) * 1e6, "dur": seconds * 1e6, "ph": "X"}  # fmt: skip


def synthetic_trace(steps: int = 9, validate_at: int = 4) -> list[dict]:
    """An off-mode run: each 1 s step generates 0.5 s, then log-probs 0.1 s, update 0.3 s,
    sync 0.1 s; one validation (0.4 s) after step ``validate_at``; plus Ray's sub-events."""
    events, spans, t = [], [], 0.0
    for step in range(1, steps + 1):
        events.append(ray_call("RolloutWorker", "generate_stream", "w-roll", t, 0.5))
        spans.append(("gen", T0 + t, 0.5, "MainThread"))
        for rank in ("w-a0", "w-a1"):
            events.append(ray_call("DeepSpeedActorWorker", "compute_log_prob", rank, t + 0.5, 0.1))
            events.append(ray_call("DeepSpeedActorWorker", "update_policy", rank, t + 0.6, 0.3))
            events.append(ray_call("DeepSpeedActorWorker", "sync_weights", rank, t + 0.9, 0.1))
        events.append(ray_call("RolloutWorker", "receive_weights", "w-roll", t + 0.9, 0.1))
        spans += [("old_log_prob", T0 + t + 0.5, 0.1, "MainThread"),
                  ("update", T0 + t + 0.6, 0.3, "MainThread"),
                  ("sync", T0 + t + 0.9, 0.1, "MainThread")]  # fmt: skip
        t += 1.0
        if step == validate_at:
            spans += [("validate", T0 + t, 0.4, "MainThread"), ("gen", T0 + t + 0.05, 0.3,
                      "MainThread")]  # fmt: skip
            events.append(ray_call("RolloutWorker", "generate_stream", "w-roll", t + 0.05, 0.3))
            t += 0.4
    events.append({"cat": "task:execute", "name": "task:execute", "pid": "127.0.0.1",
                   "tid": "w-roll", "ts": T0 * 1e6, "dur": 1.0, "ph": "X"})  # fmt: skip
    return events + driver_events(spans)


def test_timed_records_the_driver_stages_only_while_a_timeline_is_on(tmp_path):
    RunTimeline(SimpleNamespace(timeline_json_file=None), tmp_path)
    with timed({}, "off"):
        pass
    on = RunTimeline(SimpleNamespace(timeline_json_file="t.json"), tmp_path)
    assert on.path == tmp_path / "t.json"
    timings: dict[str, float] = {}
    before = time.time()
    with timed(timings, "update"):
        time.sleep(0.01)
    spans = STAGE_SPANS.stop()
    assert [(name, thread) for name, _, _, thread in spans] == [("update", "MainThread")]
    (_, start, seconds, _) = spans[0]
    assert before <= start <= before + 0.005 and seconds == timings["timing_s/update"] >= 0.01
    absolute = RunTimeline(SimpleNamespace(timeline_json_file=str(tmp_path / "a.json")), "/x")
    assert absolute.path == tmp_path / "a.json"
    STAGE_SPANS.stop()


def test_write_without_ray_keeps_the_driver_stages(tmp_path):
    """A run that failed before Ray started still leaves the stages it ran."""
    line = RunTimeline(SimpleNamespace(timeline_json_file="timeline.json"), tmp_path)
    with timed({}, "validate"):
        pass
    assert line.write() == tmp_path / "timeline.json"
    (event,) = json.loads((tmp_path / "timeline.json").read_text())
    assert event["pid"] == "driver" and event["name"] == "validate" and event["ph"] == "X"


def test_a_call_with_a_deadline_returns_raises_or_gives_up():
    """Ctrl-C and failures write the trace before the workers are killed: a hung
    ``ray.timeline()`` must give up at its deadline (the Ray side: test_timeline_ray.py)."""
    assert call_with_deadline(lambda: 7, 5, "quick") == 7
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(lambda: 1 / 0, 5, "failing")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"hung: no answer within 0.2 s"):
        call_with_deadline(lambda: time.sleep(30), 0.2, "hung")
    assert time.monotonic() - start < 2


def test_only_this_jobs_workers_are_kept():
    """On a shared cluster ``ray.timeline()`` lists every job's workers."""
    ours = {**ray_call("RolloutWorker", "generate_stream", "w-ours", 0, 1),
            "args": {"task_id": "c8ef45ccd0112571ffff" + "02000000"}}  # fmt: skip
    theirs = {**ray_call("Other", "run", "w-theirs", 0, 1), "args": {"task_id": "ab01000000"}}
    sub = {"cat": "task:execute", "name": "task:execute", "tid": "w-ours", "ph": "X"}
    driver = {"cat": "submit_task", "name": "submit_task", "tid": "w-driver", "ph": "X"}
    assert own_job([ours, theirs, sub, driver], "02000000") == [ours, sub]


def test_lanes_are_the_driver_threads_then_each_worker_by_class():
    lanes = load_lanes(synthetic_trace())
    assert [lane.label for lane in lanes] == [
        "driver: loop",
        "DeepSpeedActorWorker 0",
        "DeepSpeedActorWorker 1",
        "RolloutWorker 0",
    ]
    rollout = lanes[-1]
    assert rollout.spans[0] == (0.0, 0.5, "generate_stream")  # seconds from the first event
    assert len(rollout.spans) == 9 * 2 + 1  # Ray's task:execute sub-events are not calls
    with pytest.raises(ValueError, match="no remote calls"):
        load_lanes([{"cat": "task:execute", "ph": "X", "ts": 0, "dur": 1, "tid": "w"}])


def test_the_window_is_whole_steps_from_the_middle_without_the_validation():
    lanes = load_lanes(synthetic_trace(steps=9, validate_at=4))
    a, b = default_window(lanes, steps=4)
    updates = sorted(e for _, e, name in lanes[0].spans if name == "update")
    assert (a, b) == pytest.approx((updates[4], updates[8]))  # the middle would hold it
    a, b = default_window(load_lanes(synthetic_trace(steps=9, validate_at=99)), steps=4)
    assert (a, b) == pytest.approx((2.9, 6.9))  # the middle: steps 4-7
    few = load_lanes(synthetic_trace(steps=3, validate_at=99))
    assert default_window(few, steps=4) == pytest.approx((0.0, 3.0))


def test_idle_by_role_is_measured_on_the_workers_between_the_first_and_last_update():
    lanes = load_lanes(synthetic_trace(steps=9, validate_at=4))
    idle = idle_by_role(lanes)
    # update ends 0.9 .. 9.3 (8.4 s, a 0.4 s validation in it): the rollout worker runs
    # 8 x (0.5 + 0.1) + 0.3 s of calls there, each actor rank 8 x 0.5 s
    assert idle["rollout_idle"] == pytest.approx(1 - (8 * 0.6 + 0.3) / 8.4)
    assert idle["actor_idle"] == pytest.approx(1 - 8 * 0.5 / 8.4)
    assert idle_by_role(load_lanes(synthetic_trace(steps=1))) is None


def test_busy_counts_nested_stages_once_and_names_what_filled_the_lane():
    lane = Lane("driver: loop", [(0.0, 1.0, "validate"), (0.2, 0.6, "gen"), (2.0, 3.0, "update")])
    assert lane.busy(0.0, 4.0) == pytest.approx(0.5)
    assert lane.busy(0.5, 2.5) == pytest.approx(0.5)
    (line,) = describe([lane], (0.0, 4.0))
    assert line == "driver: loop: busy 50% (validation 25%, update 25%)"
    rollout = Lane("RolloutWorker 0", [(0.0, 3.0, "generate_stream"), (3.0, 4.0, "load_weights")])
    assert describe([rollout], (0.0, 4.0)) == [
        "RolloutWorker 0: busy 100% (generation 75%, weight sync 25%)"
    ]
    assert stage_group("update_weights") == "weight sync"  # a sync, not an update
    assert stage_group("compute_log_prob") == "old log-probs"
    assert stage_group("wait_batch") == "waiting for a batch"
    assert stage_group("health") == "other"


def test_parse_window_names_the_flag():
    assert parse_window("30:34.5") == (30.0, 34.5)
    for bad in ("30", "a:b", "5:5"):
        with pytest.raises(ValueError, match="--window"):
            parse_window(bad)


def test_plot_and_cli_write_a_real_png(tmp_path, capsys):
    trace = tmp_path / "run" / "timeline.json"
    trace.parent.mkdir()
    trace.write_text(json.dumps(synthetic_trace()))
    out = plot_timeline(trace, tmp_path / "t.png")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] == 1320 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    assert plot_main(["--timeline", str(trace.parent), "--window", "1:3"]) == 0
    printed = capsys.readouterr().out
    assert "RolloutWorker 0: busy 60% (generation 50%, weight sync 10%)" in printed
    assert (trace.parent / "timeline.png").is_file()
    with pytest.raises(SystemExit):
        plot_main(["--timeline", str(tmp_path)])
    assert "trainer.timeline_json_file=timeline.json" in capsys.readouterr().err


def test_the_plot_module_needs_no_ray():
    """fipo-plot runs where the trace was copied to: no Ray import on the way."""
    code = f"import sys, {timeline_plot.__name__}; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"  # fmt: skip
