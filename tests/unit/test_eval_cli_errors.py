"""fipo-eval: bad --out / --save-responses are refused before sampling, a write that still
fails keeps the results, and weights that do not match config.json are one error line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fipo_trainer.data.synthetic import make_rows, write_rows
from fipo_trainer.data.tiny_model import build_tiny_model
from fipo_trainer.trainer.evaluate import main


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return build_tiny_model()


def _argv(model, tmp_path, *extra):
    data = write_rows(make_rows(2, seed=0, split="test"), tmp_path / "arith.parquet")
    return ["--model", str(model), "--data", str(data), "--k", "1", "--max-prompts", "1",
            "--max-tokens", "4", "--engine", "hf", "--reward-workers", "1", *extra]


@pytest.mark.parametrize("flag", ["--out", "--save-responses"])
def test_an_output_that_is_a_directory_is_refused_before_sampling(tmp_path, tiny_model, capsys, flag):
    """It used to fail with IsADirectoryError after the whole run (hours on AIME k=32)."""
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    assert main(_argv(tiny_model, tmp_path, flag, str(outdir))) == 2
    captured = capsys.readouterr()
    assert f"{flag} {outdir} is a directory; pass a file path such as {outdir}/" in captured.err
    assert "Traceback" not in captured.err and "prompts x k=" not in captured.out  # no engine
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(_argv(tiny_model, tmp_path, flag, str(afile / "sub" / "r.json"))) == 2
    assert f"{afile} is a file, not a directory" in capsys.readouterr().err


@pytest.mark.skipif(not os.access("/dev/full", os.W_OK), reason="needs /dev/full")
def test_a_write_that_fails_after_sampling_keeps_the_results(tmp_path, tiny_model, capsys, monkeypatch):
    """/dev/full passes the checks but every write fails (ENOSPC): the results must land in
    a fallback file and the exit status must say so, not a traceback that loses them."""
    fallback_dir = tmp_path / "fallback"
    fallback_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fallback_dir))
    responses = tmp_path / "responses.jsonl"
    rc = main(_argv(tiny_model, tmp_path, "--out", "/dev/full", "--save-responses", str(responses)))
    out = capsys.readouterr().out
    assert rc == 1 and "avg@1" in out  # the table is still printed
    match = re.search(r"could not write --out /dev/full: .*; the results were saved to (\S+) instead", out)
    assert match, out
    saved = json.loads(Path(match.group(1)).read_text())
    assert Path(match.group(1)).parent == fallback_dir and saved["k"] == 1 and "arithmetic" in saved["results"]
    assert len(responses.read_text().splitlines()) == 1  # the other file is written as asked


def test_weights_that_do_not_match_config_json_are_one_error_line(tmp_path, tiny_model):
    """config.json of the 64-wide model beside the weights of a 128-wide one: it used to end
    in transformers' raw RuntimeError traceback. Run as a process: stderr as a user sees it."""
    wide = build_tiny_model(hidden_size=128)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_model, mixed)
    shutil.copy(wide / "model.safetensors", mixed / "model.safetensors")
    code = "import sys; from fipo_trainer.trainer.evaluate import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, *_argv(mixed, tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fipo-eval: error:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"fipo-eval: error: could not load --model {mixed}: ")
    assert "config.json and the weights may come from different models" in lines[0]
