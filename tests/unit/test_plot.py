"""fipo-plot: curves PNG from a metrics.jsonl written by the Tracker; missing panels never crash."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from fipo_trainer.trainer.plot import load_series, main, plot_run
from fipo_trainer.trainer.tracking import Tracker


def _write_run(run_dir, steps=12, with_fipo=True):
    with Tracker(["jsonl"], run_dir, "p", "e", {}, steps) as t:
        t.log({"val/mean@4": 0.2, "val/arithmetic/mean@4": 0.2}, step=0)
        for s in range(1, steps + 1):
            m = {
                "reward/score_mean": -1 + s / steps,
                "reward/acc_mean": s / steps / 2,
                "rollout/response_length_mean": 20 + s,
                "rollout/response_length_max": 40 + s,
                "actor/pg_clipfrac": 0.01 * s,
                "actor/entropy": 1.0 - 0.05 * s,
                "actor/ppo_kl": math.nan if s == 3 else 1e-3 * s,
            }
            if with_fipo:
                m.update({
                    "actor/influence_weights_mean": 1.0 + 0.01 * s,
                    "actor/influence_weights_min": 0.9,
                    "actor/influence_weights_max": 1.2,
                    "actor/IW_upper_clip_ratio": 0.001 * s,
                })
            if s % 4 == 0:
                m["val/mean@4"] = 0.2 + 0.05 * s
            t.log(m, step=s)
    return run_dir / "metrics.jsonl"


def _check_png(path):
    assert path.is_file() and path.stat().st_size > 20_000
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[:2] == (1100, 1200)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # real drawing, not a blank canvas


def test_load_series_merges_steps_and_drops_nulls(tmp_path):
    path = _write_run(tmp_path)
    with path.open("a") as f:
        f.write(json.dumps({"step": 12, "extra": 5.0}) + "\n")  # same step logged twice
    series = load_series(path)
    assert series["val/mean@4"] == ([0, 4, 8, 12], pytest.approx([0.2, 0.4, 0.6, 0.8]))
    assert 3 not in series["actor/ppo_kl"][0] and len(series["actor/ppo_kl"][0]) == 11
    assert series["extra"] == ([12], [5.0]) and series["reward/acc_mean"][0][-1] == 12


def test_plot_run_writes_a_real_png(tmp_path):
    out = plot_run(_write_run(tmp_path), tmp_path / "out" / "curves.png")
    assert out == tmp_path / "out" / "curves.png"
    _check_png(out)


def test_missing_panels_and_empty_file_do_not_crash(tmp_path):
    dapo = _write_run(tmp_path / "dapo", with_fipo=False)  # no influence weights under DAPO
    _check_png(plot_run(dapo, tmp_path / "dapo.png"))
    empty = tmp_path / "empty" / "metrics.jsonl"
    empty.parent.mkdir()
    empty.write_text("not json\n")
    assert plot_run(empty, tmp_path / "empty.png").stat().st_size > 10_000


def test_cli_accepts_run_dir_or_file(tmp_path, capsys):
    _write_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    _check_png(tmp_path / "curves.png")
    assert main([str(tmp_path / "metrics.jsonl"), "-o", str(tmp_path / "x.png")]) == 0
    _check_png(tmp_path / "x.png")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("bad, said", [
    ("outdir", "is a directory; pass a file path such as"),
    ("x.svg", "writes PNG only; use a .png file name"),
    ("afile/sub/x.png", "afile is a file, not a directory"),
])
def test_cli_refuses_a_bad_out_before_drawing(tmp_path, capsys, bad, said):
    """-o a directory used to end in IsADirectoryError; -o x.svg silently held PNG bytes."""
    _write_run(tmp_path / "run")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "run"), "-o", str(tmp_path / bad)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and said in err and "-o/--out" in err and "Traceback" not in err
    assert not (tmp_path / "x.svg").exists() and list((tmp_path / "outdir").iterdir()) == []
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "outdir" / "c.PNG")]) == 0
    _check_png(tmp_path / "outdir" / "c.PNG")
