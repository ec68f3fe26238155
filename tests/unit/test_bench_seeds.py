"""``scripts/bench_seeds.py``: the quickstart over several seeds, its medians and how many
seeds meet the 0.55-within-150 s target; run through ``bench_pipeline`` on a fake trainer."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.helpers.scripts import load_script

bp = load_script("bench_pipeline")
bs = load_script("bench_seeds")


def test_median_counts_a_run_that_never_got_there_as_latest():
    assert bs.median_or_never([103.0, None, 116.0], never=True) == 116.0
    assert bs.median_or_never([103.0, None, None], never=True) is None  # most never did
    assert bs.median_or_never([100.0, None], never=True) is None  # half never did
    assert bs.median_or_never([], never=True) is None
    assert bs.median_or_never([0.5, None, 0.7], never=False) == pytest.approx(0.6)
    assert bs.median_or_never([None], never=False) is None


def run(status="ok", to_055=None, s_per_step=0.6, val_final=0.5):
    return {"status": status, "s_per_step": s_per_step, "startup_s": 12.0,
            "time_to_0.45_s": 90.0, "time_to_0.55_s": to_055, "val_first": 0.25,
            "val_final": val_final, "busy_cores": 1.7, "peak_pss_bytes": 2**30}  # fmt: skip


def test_aggregate_per_mode_medians_and_the_seeds_meeting_the_target():
    per_seed = {
        0: {"quickstart": {"one_step": run(to_055=None), "off": run(to_055=128.0, val_final=0.71)}},
        1: {"quickstart": {"one_step": run(to_055=162.0, s_per_step=0.7), "off": run(to_055=None)}},
        2: {"quickstart": {"one_step": run(to_055=103.0, s_per_step=0.5), "off": run("failed")}},
    }
    agg = bs.aggregate(per_seed, ["one_step", "off"])
    one = agg["one_step"]
    assert one["seeds"] == [0, 1, 2] and one["failed_seeds"] == []
    assert one["median"]["time_to_0.55_s"] == 162.0  # [103, 162, never]
    assert one["median"]["s_per_step"] == pytest.approx(0.6)
    assert one["median"]["peak_pss_gib"] == pytest.approx(1.0)
    assert (one["seeds_055_within_target"], one["seeds_055_ever"]) == (1, 2)  # 162 s is late
    off = agg["off"]
    assert off["seeds"] == [0, 1] and off["failed_seeds"] == [2]
    assert off["median"]["time_to_0.55_s"] is None  # [128, never]
    assert off["per_seed"]["0"]["val_final"] == 0.71
    assert math.isclose(off["median"]["val_final"], 0.605)


FAKE_TRAINER = """#!{python}
import json, sys, time
args = sys.argv[1:]
if "--dry-run" in args:
    print("trainer:\\n  async_mode: one_step")
    sys.exit(0)
run_dir = next(a.split("=", 1)[1].strip("'") for a in args if a.startswith("trainer.run_dir="))
seed = int(next(a.split("=", 1)[1] for a in args if a.startswith("trainer.seed=")))
vals = [0.25, 0.5, 0.6] if seed == 0 else [0.25, 0.3, 0.4]  # seed 0 learns, seed 1 does not
with open(run_dir + "/metrics.jsonl", "w") as f:
    for step, val in enumerate(vals):
        row = {{"step": step, "perf/step_seconds": 0.1, "timing_s/gen": 0.05, "val/mean@4": val}}
        f.write(json.dumps(row) + "\\n")
        f.flush()
        time.sleep(0.3)
"""


def test_main_runs_bench_pipeline_per_seed_and_sums_up(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake-train"
    fake.write_text(FAKE_TRAINER.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setattr(bp, "fipo_train", lambda: str(fake))
    out = tmp_path / "out"
    rc = bs.main(
        ["--seeds", "0,1", "--steps", "2", "--out", str(out), "recipe=quickstart_cpu_async"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1].removeprefix("SUMMARY "))
    one = summary["modes"]["one_step"]
    assert one["seeds"] == [0, 1] and one["seeds_055_ever"] == 1
    assert one["seeds_055_within_target"] == 1
    assert one["per_seed"]["0"]["val_final"] == 0.6 and one["per_seed"]["1"]["val_final"] == 0.4
    assert summary["overrides"] == ["recipe=quickstart_cpu_async"]
    for seed in (0, 1):  # each seed's own bench_pipeline output, with the seed appended
        assert json.loads((out / f"seed_{seed}" / "results.json").read_text())["quickstart"]
        assert (out / f"seed_{seed}" / "quickstart_one_step.log").exists()
    assert (out / "seeds.png").stat().st_size > 10_000

    # --no-run reads what is there; a seed without results is said and left out
    rc = bs.main(["--seeds", "0,1,5", "--no-run", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and "seed 5: no results" in captured.err
    again = json.loads(captured.out.strip().splitlines()[-1].removeprefix("SUMMARY "))
    assert again["modes"]["one_step"]["seeds"] == [0, 1]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--seeds", "0,x"], "--seeds takes integers"),
        (["--modes", "fast"], "unknown mode(s) ['fast']"),
        (["trainer.seed=3"], "give seeds with --seeds"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(argv, said, capsys):
    with pytest.raises(SystemExit) as err:
        bs.main(argv)
    assert err.value.code == 2 and said in capsys.readouterr().err


def test_the_figure_colours_by_mode_with_a_line_per_seed():
    def curve(*vals):
        return {"val_curve": [[10.0 * i, 25 * i, v] for i, v in enumerate(vals)],
                "step_seconds": [[1, 0.6, 2], [2, 0.7, 1]]}  # fmt: skip

    per_seed = {s: {"quickstart": {"one_step": curve(0.25, 0.5), "off": curve(0.25, 0.6)}}
                for s in (0, 1, 2)}  # fmt: skip
    val_ax, step_ax = bs.seeds_figure(per_seed, ["one_step", "off"]).axes
    assert val_ax.get_legend_handles_labels()[1] == ["one_step (3 seeds)", "off (3 seeds)"]
    lines = [ln for ln in val_ax.get_lines() if ln.get_color() != "grey"]  # not the targets
    assert len(lines) == 6 and len({ln.get_color() for ln in lines}) == 2
    assert len(step_ax.get_lines()) == 6
