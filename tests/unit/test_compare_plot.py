"""fipo-plot --compare: one labelled line per run (or seed group) in every panel, seeds
grouped into a mean line + min-max band; checked on the Figure's axes, not on pixels."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from omegaconf import OmegaConf

from fipo_trainer.trainer.compare_plot import (
    compare_figure,
    group_runs,
    is_seed_override,
    load_runs,
)
from fipo_trainer.trainer.plot import PANELS, main
from fipo_trainer.trainer.tracking import Tracker


def write_run(run_dir: Path, overrides: list[str] | None, offset: float = 0.0, steps: int = 10) -> Path:
    """A run dir as fipo-train leaves it: metrics.jsonl (+ .hydra/overrides.yaml)."""
    with Tracker(["jsonl"], run_dir, "p", "e", {}, steps) as t:
        t.log({"val/mean@4": 0.2 + offset, "val/arithmetic/mean@4": 0.2 + offset}, step=0)
        for s in range(1, steps + 1):
            m = {
                "reward/score_mean": -1 + s / steps + offset,
                "reward/acc_mean": s / steps / 2,
                "response_length/mean": 20 + s + offset,
                "actor/influence_weights_mean": 1.0 + 0.01 * s + offset,
                "actor/influence_weights_max": 1.2,
                "actor/pg_clipfrac": 0.01 * s + offset,
                "actor/entropy": 1.0 - 0.05 * s + offset,
                "actor/ppo_kl": 1e-3 * s,
            }
            if s % 5 == 0:
                m["val/mean@4"] = 0.2 + 0.05 * s + offset
            t.log(m, step=s)
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    return run_dir


def test_two_runs_draw_two_labelled_lines_per_panel(tmp_path):
    common = ["recipe=ablations/fipo_vs_dapo", "trainer.total_training_steps=10"]
    fipo = write_run(tmp_path / "a", ["algorithm=fipo", *common])
    dapo = write_run(tmp_path / "b", ["algorithm=dapo", *common], offset=0.1)
    fig = compare_figure(load_runs([fipo, dapo]))
    axes = fig.axes
    assert len(axes) == len(PANELS) == 6
    for ax, panel in zip(axes, PANELS):
        lines = ax.get_lines()
        assert len(lines) == 2, panel.title
        assert [line.get_label() for line in lines] == ["algorithm=fipo", "algorithm=dapo"]
        assert lines[0].get_color() != lines[1].get_color()
        legend = ax.get_legend()
        assert legend is not None
        assert [t.get_text() for t in legend.get_texts()] == ["algorithm=fipo", "algorithm=dapo"]
        assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no seeds
    # one metric per panel: the overall validation key, not the per-source one
    val = axes[1]
    assert "val/mean@4" in val.get_title() and "arithmetic" not in val.get_title()
    assert list(val.get_lines()[0].get_xdata()) == [0, 5, 10]
    assert list(val.get_lines()[1].get_ydata()) == pytest.approx([0.3, 0.55, 0.8])


def test_seeds_are_grouped_into_a_mean_line_and_a_min_max_band(tmp_path):
    runs = [
        write_run(tmp_path / f"f{seed}", ["algorithm=fipo", f"trainer.seed={seed}"], offset=0.1 * seed)
        for seed in range(3)
    ]
    runs.append(write_run(tmp_path / "d0", ["algorithm=dapo", "trainer.seed=0"]))
    fig = compare_figure(load_runs(runs))
    ax = fig.axes[4]  # clip fractions: pg_clipfrac = 0.01 s + offset
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["algorithm=fipo (3 seeds)", "algorithm=dapo"]
    assert list(lines[0].get_ydata()) == pytest.approx([0.01 * s + 0.1 for s in range(1, 11)])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # the single DAPO run has no band
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.01) and ys.max() == pytest.approx(0.1 + 0.2)
    assert bands[0].get_facecolor()[0][:3] == pytest.approx(
        to_rgb(lines[0].get_color())
    )


def test_labels_and_grouping_rules(tmp_path):
    assert is_seed_override("trainer.seed=3") and is_seed_override("data.seed=1")
    assert is_seed_override("model.tiny.seed=0") and not is_seed_override("trainer.seeds_x=1")
    bare = write_run(tmp_path / "my_run", None)  # no .hydra: the dir name
    other = write_run(tmp_path / "other", None)
    groups = group_runs(load_runs([bare, other]))
    assert [g.label for g in groups] == ["my_run", "other"]


def test_cli_compare_writes_the_png_into_the_common_parent(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    a = write_run(sweep / "algorithm=fipo", ["algorithm=fipo"])
    b = write_run(sweep / "algorithm=dapo", ["algorithm=dapo"])
    assert main(["--compare", str(a), str(b), "--smooth", "3"]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == sweep / "compare.png" and out.stat().st_size > 20_000
    assert main(["--compare", str(a), str(b), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
    with pytest.raises(SystemExit):
        main(["--compare", str(a), str(tmp_path / "missing")])


@pytest.mark.parametrize("bad, said", [
    ("outdir", "is a directory; pass a file path such as"),
    ("c.svg", "writes PNG only; use a .png file name such as"),
])
def test_cli_compare_refuses_a_directory_or_non_png_out(tmp_path, capsys, bad, said):
    a = write_run(tmp_path / "a", None)
    b = write_run(tmp_path / "b", None)
    (tmp_path / "outdir").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["--compare", str(a), str(b), "-o", str(tmp_path / bad)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and said in err and "-o/--out" in err and "Traceback" not in err
    assert not (tmp_path / "c.svg").exists() and list((tmp_path / "outdir").iterdir()) == []
    if bad == "outdir":
        assert f"{tmp_path / 'outdir' / 'compare.png'}" in err  # the --compare default name
