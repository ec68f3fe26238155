"""scripts/bench_pipeline_plot.py: the runs' validation-against-time and s/step curves."""

from __future__ import annotations

import json

import pytest

from tests.helpers.scripts import load_script

plot = load_script("bench_pipeline_plot")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(vals: list[float], seconds: list[float], rounds: list | None = None) -> dict:
    rounds = rounds or [None] * len(seconds)
    return {
        "status": "ok",
        "val_curve": [[15.0 + 40.0 * i, 25 * i, v] for i, v in enumerate(vals)],
        "step_seconds": [[i + 1, s, r] for i, (s, r) in enumerate(zip(seconds, rounds))],
    }


RESULTS = {
    "quickstart": {
        "off": run([0.25, 0.4, 0.6], [1.0, 1.2, 0.9, 1.1], [1.0, 2.0, None, 3.0]),
        "one_step": run([0.25, 0.45], [0.6, 0.5, 0.7]),
        "bounded": {"status": "refused", "error": "unknown key"},
    }
}


def data_lines(ax) -> list:
    """The plotted runs (the threshold and target lines have no label)."""
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def test_running_median_and_mean_trail_over_the_window():
    assert plot.running_median([1.0, 9.0, 2.0, 3.0, 8.0], 3) == [1.0, 5.0, 2.0, 3.0, 3.0]
    nan = float("nan")
    mean = plot.running_mean([nan, 1.0, nan, 3.0, 5.0], 2)
    assert mean[0] != mean[0] and mean[1:] == [1.0, 1.0, 3.0, 4.0]  # NaN where nothing known


def test_each_run_is_one_line_per_panel_in_one_colour():
    fig = plot.curves_figure({"out": RESULTS})
    val_ax, step_ax, rounds_ax = fig.axes  # the rounds' axis: one run recorded them
    (rounds,) = rounds_ax.get_lines()
    assert rounds.get_linestyle() == ":" and list(rounds.get_ydata()) == [1.0, 1.5, 1.5, 2.0]
    vals, steps = data_lines(val_ax), data_lines(step_ax)
    assert [ln.get_label() for ln in vals] == ["quickstart/off", "quickstart/one_step"]
    assert [ln.get_label() for ln in steps] == ["quickstart/off", "quickstart/one_step"]
    assert list(vals[0].get_xdata()) == [15.0, 55.0, 95.0]  # seconds since the start
    assert list(vals[0].get_ydata()) == [0.25, 0.4, 0.6]
    assert list(steps[1].get_ydata()) == [0.6, 0.55, 0.6]  # running median
    assert [a.get_color() for a in vals] == [b.get_color() for b in steps]
    assert rounds.get_color() == vals[0].get_color()
    # 0.45, 0.55 and the 150 s target are drawn
    marks = [ln for ln in val_ax.get_lines() if ln.get_label().startswith("_")]
    levels = sorted(ln.get_ydata()[0] for ln in marks if tuple(ln.get_xdata()) == (0, 1))
    assert levels == [0.45, 0.55]
    assert [tuple(ln.get_xdata()) for ln in marks if tuple(ln.get_ydata()) == (0, 1)] == [
        (150.0, 150.0)
    ]


def test_several_results_files_are_named_and_a_refused_run_is_left_out(tmp_path):
    for name in ("seed0", "seed1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(RESULTS))
    out = tmp_path / "compare.png"
    assert plot.main([str(tmp_path / n / "results.json") for n in ("seed0", "seed1")]
                     + ["-o", str(out)]) == 0  # fmt: skip
    assert out.read_bytes().startswith(PNG_MAGIC)
    fig = plot.curves_figure({"seed0": RESULTS, "seed1": RESULTS})
    assert [ln.get_label() for ln in data_lines(fig.axes[0])] == [
        "seed0: quickstart/off", "seed0: quickstart/one_step",
        "seed1: quickstart/off", "seed1: quickstart/one_step",
    ]  # fmt: skip


def test_no_curves_still_draws_and_a_bad_file_names_itself(tmp_path, capsys):
    out = plot.plot_curves({"out": {"quickstart": {"off": {"status": "failed"}}}},
                           tmp_path / "sub" / "curves.png")  # fmt: skip
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert len(plot.curves_figure({"out": {"quickstart": {"one_step": run([0.3], [0.5])}}}).axes) == 2
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        plot.main([str(bad)])
    assert exc.value.code == 2
    assert str(bad) in capsys.readouterr().err
