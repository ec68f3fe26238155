"""Fixtures shared across the suite (models built once per session and cached on disk)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def warm_tiny_model():
    """The tiny Qwen2 warm-started for 40 steps (the directory; one cached build serves every
    test that asks for these settings)."""
    from fipo_trainer.data.tiny_model import build_tiny_model

    return build_tiny_model(warm_start_steps=40)
