"""scripts/metrics_tail.py: only the rows a run writes after its launch are its own."""

from __future__ import annotations

import os

from tests.helpers.scripts import load_script

mt = load_script("metrics_tail")


def test_lines_come_whole_and_a_partial_one_waits(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = mt.MetricsTail(path)
    assert tail.read() == []  # not written yet
    path.write_text('{"step": 1}\n{"st')
    assert tail.read() == ['{"step": 1}']
    with path.open("a") as f:
        f.write('ep": 2}\n')
    assert tail.read() == ['{"step": 2}']
    with path.open("a") as f:
        f.write('{"step": 3}')
    assert tail.read() == [] and tail.rest() == ['{"step": 3}']


def test_an_earlier_runs_file_moved_away_is_never_read(tmp_path):
    """As the trainer does: the old file goes to earlier_runs/, a new one is started."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    tail = mt.MetricsTail(path)
    assert tail.read() == []
    (tmp_path / "earlier_runs").mkdir()
    os.rename(path, tmp_path / "earlier_runs" / "metrics.jsonl")
    path.write_text('{"step": 1, "new": true}\n')
    assert tail.read() == ['{"step": 1, "new": true}']


def test_a_file_appended_to_is_read_from_where_it_stood(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    tail = mt.MetricsTail(path)
    with path.open("a") as f:
        f.write('{"step": 2}\n')
    assert tail.read() == ['{"step": 2}']


def test_a_file_rewritten_in_place_is_read_again_from_its_start(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    tail = mt.MetricsTail(path)
    path.write_text('{"step": 1}\n')  # same inode, shorter
    assert tail.read() == ['{"step": 1}']
