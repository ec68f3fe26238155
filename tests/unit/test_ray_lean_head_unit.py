"""``_lean_head`` swaps Ray's head-process starters only while Ray starts, and falls back to the
full head on a Ray that lacks them (no Ray is started here)."""

from __future__ import annotations

import logging

import pytest
from ray._private.node import Node

from fipo_trainer.cluster.ray_init import LEAN_HEAD_SKIPS, _lean_head


def test_the_starters_are_skipped_inside_and_restored_after_an_error() -> None:
    originals = {name: getattr(Node, name) for name in LEAN_HEAD_SKIPS}
    with pytest.raises(RuntimeError, match="start failed"), _lean_head(True):
        for name in LEAN_HEAD_SKIPS:
            assert getattr(Node, name) is not originals[name]
            assert getattr(Node, name)(object(), include_dashboard=False, raise_on_failure=True) is None
        raise RuntimeError("start failed")
    assert {name: getattr(Node, name) for name in LEAN_HEAD_SKIPS} == originals


def test_off_changes_nothing() -> None:
    originals = {name: getattr(Node, name) for name in LEAN_HEAD_SKIPS}
    with _lean_head(False):
        assert {name: getattr(Node, name) for name in LEAN_HEAD_SKIPS} == originals


def test_a_ray_without_the_starters_starts_in_full_with_a_warning(monkeypatch, caplog) -> None:
    monkeypatch.delattr(Node, "start_monitor")
    api_server = Node.start_api_server
    with caplog.at_level(logging.WARNING), _lean_head(True):
        assert Node.start_api_server is api_server  # nothing swapped: the full head starts
    assert "has no Node.start_monitor: its full head starts" in caplog.text
