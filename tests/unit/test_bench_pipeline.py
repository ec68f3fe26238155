"""scripts/bench_pipeline.py's pure parts: metrics rows -> per-run numbers -> SUMMARY."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers.scripts import load_script

bp = load_script("bench_pipeline")
pt = load_script("process_tree")
bpr = load_script("bench_pipeline_report")


def step_row(step: int, **extra: float) -> str:
    row = {
        "step": step,
        "perf/step_seconds": 2.0,
        "timing_s/gen": 1.5,
        "timing_s/old_log_prob": 0.1,
        "timing_s/update": 0.3,
        "timing_s/sync": 0.1,
        "rollout/tokens_per_s": 1000.0,
        **extra,
    }
    return json.dumps(row)


def rows_of(timed_lines: list[tuple[float, list[str]]]) -> dict:
    rows: dict = {}
    for t, lines in timed_lines:
        bp.parse_lines(lines, t, rows)
    return rows


def test_parse_lines_merges_by_step_keeps_first_time_and_skips_bad_lines():
    rows = rows_of(
        [
            (1.0, [json.dumps({"step": 0, "val/mean@4": 0.2}), "{partial", "", "[1]"]),
            (2.0, [step_row(1), json.dumps({"no_step": 1})]),
            (3.0, [json.dumps({"step": 1, "async/staleness_max": 1})]),
        ]
    )
    assert sorted(rows) == [0, 1]
    assert rows[1].t == 2.0 and rows[1].metrics["async/staleness_max"] == 1
    assert rows[1].metrics["timing_s/gen"] == 1.5


def test_run_stats_numbers():
    rows = rows_of(
        [
            (10.0, [json.dumps({"step": 0, "val/mean@4": 0.25, "timing_s/validate": 3.0})]),
            (14.5, [step_row(1)]),
            (16.5, [step_row(2, **{"perf/step_seconds": 4.0, "timing_s/wait_batch": 0.5})]),
            (19.0, [step_row(3, **{"val/mean@4": 0.5, "timing_s/validate": 0.5})]),
            (21.0, [step_row(4, **{"val/mean@4": 0.6, "rollout/response_tokens": 500.0})]),
        ]
    )
    s = bp.run_stats(rows, wall_s=30.0)
    assert s["steps"] == 4 and s["wall_s"] == 30.0
    assert s["s_per_step"] == 2.0  # median of 2, 4, 2, 2
    # tokens: 3 x (1000 tok/s x 1.5 s) + 500, over 10 s of steps
    assert s["gen_tokens_per_s"] == pytest.approx((3 * 1500 + 500) / 10)
    assert s["rollout_idle"] == pytest.approx(1 - 4 * 1.5 / 10)
    assert s["actor_idle"] == pytest.approx(1 - 4 * 0.5 / 10)
    assert s["wait_batch_s"] == 0.5 and s["staleness_max"] is None
    assert s["val_first"] == 0.25 and s["val_final"] == 0.6
    assert s["time_to_0.45_s"] == 19.0 and s["time_to_0.55_s"] == 21.0
    assert s["startup_s"] == pytest.approx(14.5 - 2.0)
    # the curves bench_pipeline_plot draws: (time, step, val) and (step, seconds)
    assert s["val_curve"] == [[10.0, 0, 0.25], [19.0, 3, 0.5], [21.0, 4, 0.6]]
    assert s["step_seconds"] == [[1, 2.0, None], [2, 4.0, None], [3, 2.0, None], [4, 2.0, None]]


def test_run_stats_without_step_timer_or_rows():
    rows = rows_of([(5.0, [step_row(1)]), (8.0, [step_row(2)]), (12.0, [step_row(3)])])
    for r in rows.values():
        del r.metrics["perf/step_seconds"]
    s = bp.run_stats(rows)
    assert s["s_per_step"] == 3.5  # between rows
    assert s["step_seconds"] == [[2, 3.0, None], [3, 4.0, None]]  # the time since the last
    rows[3].metrics["sampling/gen_rounds"] = 2.0  # dynamic sampling's rounds, when there
    assert bp.run_stats(rows)["step_seconds"][1] == [3, 4.0, 2.0]
    assert s["val_final"] is None and s["time_to_0.45_s"] is None
    empty = bp.run_stats({}, wall_s=1.0)
    assert empty["steps"] == 0 and empty["s_per_step"] is None and empty["rollout_idle"] is None


def test_idle_is_clamped():
    assert bp._idle(3.0, 2.0) == 0.0 and bp._idle(0.0, 2.0) == 1.0 and bp._idle(1.0, 0.0) is None


def test_summary_speedups_deltas_and_quickstart_numbers():
    results = {
        "heavy": {
            "off": {"s_per_step": 3.0, "val_final": 0.40},
            "one_step": {"s_per_step": 2.0, "val_final": 0.42},
            "bounded": {"status": "refused", "error": "unknown key"},
        },
        "quickstart": {
            "off": {
                "startup_s": 30.0,
                "startup_cpu_s": 41.0,
                "s_per_step": 0.9,
                "time_to_0.45_s": 140.0,
                "time_to_0.55_s": None,
                "peak_mem_bytes": 3 * 2**30,
                "peak_pss_bytes": 2**30,
                "busy_cores": 1.3,
            }
        },
        "plain": {"off": {"s_per_step": 0.6}},
    }
    out = bp.summary(results, "off")
    assert out["speedup_one_step"] == 1.5 and out["val_delta_one_step"] == pytest.approx(0.02)
    assert out["speedup_bounded"] is None and out["val_delta_bounded"] is None
    assert out["quickstart_startup_s"] == 30.0 and out["quickstart_s_per_step"] == 0.9
    assert out["quickstart_startup_cpu_s"] == 41.0
    assert out["quickstart_time_to_045_s"] == 140.0 and out["quickstart_time_to_055_s"] is None
    assert out["quickstart_peak_mem_gib"] == 3.0 and out["quickstart_busy_cores"] == 1.3
    assert out["quickstart_peak_pss_gib"] == 1.0
    assert out["quickstart_like_for_like_s_per_step"] == 0.6
    assert set(bp.summary({}, "off")) == set(out)  # every key, even with nothing run
    json.dumps(out)


def test_parse_steps_and_refusal():
    assert bp.parse_steps("3", ["quickstart", "heavy"]) == {"quickstart": 3, "heavy": 3}
    assert bp.parse_steps("heavy=5", ["quickstart", "heavy"]) == {
        "quickstart": bp.DEFAULT_STEPS["quickstart"],
        "heavy": 5,
    }
    assert bp.refusal("a\n\n  b\nc\nd\n") == "b | c | d"


def test_tree_monitor_samples_pss_next_to_rss():
    """A process sharing torch's libraries with this one: its PSS is charged part of them."""
    import subprocess

    import torch  # noqa: F401  (shared with the child)

    child = subprocess.Popen(
        [sys.executable, "-c", "import torch, time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "up"
        monitor = pt.TreeMonitor(child.pid)
        monitor.sample()
        assert 0 < monitor.peak_pss < monitor.peak_rss
        assert pt.pss_bytes(child.pid) > 0
    finally:
        child.kill()
        child.wait()


FAKE_TRAINER = """#!{python}
import json, sys, time
run_dir = next(a.split("=", 1)[1].strip("'") for a in sys.argv if a.startswith("trainer.run_dir="))
end = time.process_time() + 0.4
while time.process_time() < end:  # start-up work
    pass
with open(run_dir + "/metrics.jsonl", "w") as f:
    f.write(json.dumps({{"step": 1, "perf/step_seconds": 0.1, "timing_s/gen": 0.05}}) + "\\n")
time.sleep(1.5)  # the bench sees the row while the process lives
"""


def run_fake(script: str, tmp_path, monkeypatch) -> dict:
    """``bench_pipeline.run_one`` on a fake ``fipo-train`` (``script``, formatted)."""
    fake = tmp_path / "fake-train"
    fake.write_text(script.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setattr(bp, "fipo_train", lambda: str(fake))
    return bp.run_one([], tmp_path / "run", timeout_s=60)


def test_run_one_records_the_cpu_spent_before_the_first_step(tmp_path, monkeypatch):
    """Start-up CPU: the process tree's CPU time when the first step row appears."""
    out = run_fake(FAKE_TRAINER, tmp_path, monkeypatch)
    assert out["status"] == "ok" and out["steps"] == 1
    assert 0.3 < out["startup_cpu_s"] < 30


FAKE_TRAINER_AFTER_AN_EARLIER_RUN = """#!{python}
import json, os, sys, time
run_dir = next(a.split("=", 1)[1].strip("'") for a in sys.argv if a.startswith("trainer.run_dir="))
time.sleep(1.2)  # start-up; the earlier run's rows are still in place
os.makedirs(run_dir + "/earlier_runs/1", exist_ok=True)
os.rename(run_dir + "/metrics.jsonl", run_dir + "/earlier_runs/1/metrics.jsonl")
with open(run_dir + "/metrics.jsonl", "w") as f:
    f.write(json.dumps({{"step": 1, "perf/step_seconds": 0.1, "timing_s/gen": 0.05}}) + "\\n")
time.sleep(1.0)
"""


def test_run_one_never_reads_an_earlier_runs_rows_as_its_own(tmp_path, monkeypatch):
    """A reused run directory: the earlier run's 5 steps were read at once as this run's
    (start-up -0.5 s); the run's own one step, seen after its start-up, is what counts."""
    (tmp_path / "run").mkdir()
    earlier = [step_row(s) for s in range(1, 6)]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(earlier) + "\n")
    out = run_fake(FAKE_TRAINER_AFTER_AN_EARLIER_RUN, tmp_path, monkeypatch)
    assert out["status"] == "ok" and out["steps"] == 1
    assert out["startup_s"] > 0.9


FAKE_TRAINER_TWO_STEPS = """#!{python}
import json, sys, time
run_dir = next(a.split("=", 1)[1].strip("'") for a in sys.argv if a.startswith("trainer.run_dir="))
row = {{"perf/step_seconds": 0.1, "timing_s/gen": 0.05}}
with open(run_dir + "/metrics.jsonl", "w") as f:
    f.write(json.dumps({{"step": 1, **row}}) + "\\n")
    f.flush()
    end = time.process_time() + 1.5
    while time.process_time() < end:  # the steady state: the driver busy
        pass
    f.write(json.dumps({{"step": 2, **row}}) + "\\n")
time.sleep(1.5)
"""


def test_run_one_splits_steady_cpu_and_peak_memory_by_role(tmp_path, monkeypatch):
    """Between the first and the last step row the fake driver burns one core: the steady
    busy cores put it on the driver, and the peak PSS is charged to the driver."""
    out = run_fake(FAKE_TRAINER_TWO_STEPS, tmp_path, monkeypatch)
    assert out["status"] == "ok" and out["steps"] == 2
    busy = out["steady_busy_by_role"]
    assert set(busy) == set(pt.ROLES)
    assert busy["driver"] > 0.5
    assert busy["rollout"] == busy["actor"] == busy["grader"] == 0.0
    assert set(out["pss_by_role"]) == {"driver"} and out["pss_by_role"]["driver"] > 0
    summary = bp.summary({"quickstart": {"off": out}}, "off")
    assert summary["quickstart_steady_busy_cores_by_role"]["driver"] > 0.5
    # By phase: the burn is between the rows, the end only sleeps, and the phases' seconds
    # and CPU add up to the run's wall time and its busy cores.
    phases = out["phases"]
    assert phases["steps"]["busy_cores"] > 0.5 and phases["steps"]["s"] > 1.0
    assert phases["end"]["busy_cores"] < 0.3 and phases["end"]["s"] > 1.0
    assert sum(p["s"] for p in phases.values()) == pytest.approx(out["wall_s"])
    cpu = sum(p["s"] * p["busy_cores"] for p in phases.values())
    assert cpu / out["wall_s"] == pytest.approx(out["busy_cores"])
    assert summary["quickstart_phases"]["steps"]["busy_cores"] > 0.5
    assert summary["quickstart_pss_gib_by_role"]["driver"] > 0


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        ("ray::RolloutWorker.generate_stream", "rollout"),
        ("ray::DeepSpeedActorWorker.update_policy", "actor"),
        ("/venv/bin/python -m fipo_trainer.rewards._worker 33", "grader"),
        ("ray::IDLE", "ray"),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x", "ray"),
        ("ray::DashboardAgent", "ray"),
    ],
)
def test_role_of_names_each_process_of_a_run(cmdline, role):
    assert pt.role_of(cmdline) == role
    assert pt.role_of(cmdline, is_root=True) == "driver"


def test_tree_monitor_splits_cpu_and_pss_by_role():
    """A live tree: a child titled as the rollout worker burns a core, one titled as an
    actor rank sleeps; the monitor charges each its own CPU and memory."""
    import subprocess
    import time

    code = (
        "import subprocess, sys, time\n"
        "burn = 'import time\\nwhile True: pass'\n"
        "nap = 'import time; time.sleep(60)'\n"
        "kids = [subprocess.Popen([sys.executable, '-c', burn, 'ray::RolloutWorker']),\n"
        "        subprocess.Popen([sys.executable, '-c', nap, 'ray::DeepSpeedActorWorker'])]\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    root = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert root.stdout.readline().strip() == "up"
        monitor = pt.TreeMonitor(root.pid)
        monitor.sample()
        start = monitor.snapshot()
        time.sleep(1.5)
        monitor.sample()
        busy = monitor.busy_by_role(start, monitor.snapshot())
        assert busy["rollout"] > 0.5
        assert busy["actor"] < 0.2 and busy["driver"] < 0.2
        assert {"driver", "rollout", "actor"} <= set(monitor.peak_pss_by_role)
        assert sum(monitor.peak_pss_by_role.values()) == monitor.peak_pss
    finally:
        import os
        import signal

        os.killpg(root.pid, signal.SIGKILL)
        root.wait()


def test_a_process_keeps_the_role_it_was_seen_with():
    """Ray titles a worker ``ray::IDLE`` before and between its actor's calls; once seen as
    an actor rank it stays one (its CPU is the rank's)."""

    class Proc:
        def __init__(self, pid: int, title: str) -> None:
            self.pid, self.title = pid, title

        def cmdline(self) -> list[str]:
            return [self.title]

    import os

    monitor = pt.TreeMonitor(os.getpid())
    key = (12345, 1.0)
    monitor._note_role(key, Proc(12345, "ray::IDLE"))
    assert monitor.roles[key] == "ray"
    monitor._note_role(key, Proc(12345, "ray::DeepSpeedActorWorker"))
    monitor._note_role(key, Proc(12345, "ray::IDLE"))
    assert monitor.roles[key] == "actor"


def test_the_heavy_shape_samples_as_its_validation_at_a_smaller_lr():
    """The rollout-heavy shape must learn, or its val delta measures noise around a falling
    curve: it trains at the validation's top_p, below the quickstart's lr, with the worked
    (>= 64 token) answers and two passes that make it rollout-heavy."""
    from fipo_trainer.cli import compose_config
    from fipo_trainer.trainer.config import load_config

    quick = load_config(compose_config(["recipe=quickstart_cpu"]), build_model=False)
    heavy = load_config(
        compose_config(["recipe=quickstart_cpu", *bp.SHAPES["heavy"]]), build_model=False
    )
    assert heavy.rollout.top_p == heavy.rollout.val.top_p == 0.7 < quick.rollout.top_p
    assert heavy.actor.lr == pytest.approx(quick.actor.lr / 6)
    assert heavy.data.synthetic.solution_format == "worked" and heavy.actor.ppo_epochs == 2
    # a core per role (the GPU analogue), whatever layout the default recipe takes
    assert quick.rollout.engines_per_worker == 2
    assert heavy.rollout.engines_per_worker == 1 and heavy.resources.actor_world_size == 1


def test_busy_seconds_reads_the_cpu_line_of_proc_stat():
    # user nice system idle iowait irq softirq steal guest guest_nice (ticks)
    line = "cpu  100 20 30 400 50 6 4 10 7 0"
    assert pt.busy_seconds(line, 100.0) == pytest.approx((100 + 20 + 30 + 6 + 4 + 10) / 100)
    assert pt.busy_seconds("cpu  1 0 1 5", 1.0) == 2.0  # old kernels: four fields


FAKE_TRAINER_SHORT_CHILD = """#!{python}
import json, subprocess, sys, time
run_dir = next(a.split("=", 1)[1].strip("'") for a in sys.argv if a.startswith("trainer.run_dir="))
burn = "import time\\nend = time.process_time() + 0.1\\nwhile time.process_time() < end: pass"
for _ in range(6):  # each gone within a sampling interval: the tree sees two at most
    subprocess.run([sys.executable, "-S", "-c", burn], check=True)
with open(run_dir + "/metrics.jsonl", "w") as f:
    f.write(json.dumps({{"step": 1, "perf/step_seconds": 0.1, "timing_s/gen": 0.05}}) + "\\n")
time.sleep(1.0)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/stat"), reason="Linux /proc")
def test_the_machine_figure_counts_a_child_that_ended_between_two_samples(tmp_path, monkeypatch):
    """Six children that burn 0.1 CPU-s each, one after another, and exit: the tree's samples
    (every 0.5 s) see two of them at most; the machine's counters have them all."""
    out = run_fake(FAKE_TRAINER_SHORT_CHILD, tmp_path, monkeypatch)
    assert out["status"] == "ok"
    assert out["machine_cpu_s"] >= out["tree_cpu_s"] + 0.3
    assert out["machine_busy_cores"] == pytest.approx(out["machine_cpu_s"] / out["wall_s"])


FAKE_TRAINER_WITH_A_TIMELINE = """#!{python}
import json, os, shutil, sys, time
arg = lambda key: next(a.split("=", 1)[1].strip("'") for a in sys.argv if a.startswith(key + "="))
run_dir = arg("trainer.run_dir")
row = {{"perf/step_seconds": 1.0, "timing_s/gen": 0.5, "timing_s/update": 0.9}}
with open(run_dir + "/metrics.jsonl", "w") as f:
    f.write("".join(json.dumps({{"step": s, **row}}) + "\\n" for s in (1, 2, 3)))
here = os.path.dirname(sys.argv[0])
shutil.copy(here + "/trace.json", os.path.join(run_dir, arg("trainer.timeline_json_file")))
time.sleep(1.0)
"""


def test_run_one_takes_the_roles_idle_time_from_the_runs_timeline(tmp_path, monkeypatch):
    """The driver's timers called the one_step actor 2 % idle (its sync waits for the batch);
    its own calls on the timeline left it 43 % idle (run 36). The trace's figures win."""
    from tests.unit.test_timeline import synthetic_trace

    (tmp_path / "trace.json").write_text(json.dumps(synthetic_trace(steps=9, validate_at=4)))
    out = run_fake(FAKE_TRAINER_WITH_A_TIMELINE, tmp_path, monkeypatch)
    assert out["status"] == "ok" and out["steps"] == 3
    assert out["rollout_idle"] == pytest.approx(1 - 5.1 / 8.4)  # test_timeline's numbers
    assert out["actor_idle"] == pytest.approx(1 - 4.0 / 8.4)
    assert (tmp_path / "run" / "timeline.json").is_file()
    assert bpr.trace_idle(tmp_path) == {}  # no trace there: run_stats' timers stay
