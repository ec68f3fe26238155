"""The package's shape, checked: small modules, floors without back-arrows, roles with verbs,
the platform asked in one place (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fipo_trainer"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400

# Floors, top to bottom: a module may import its own floor and the ones below it.
FLOORS = [
    {"cli"},
    {"trainer"},
    {"actor", "rollout"},
    {"cluster"},
    {"data", "rewards"},
    {"algorithms"},
]
BASE = {"platform", "cpu_ops", "plugins", "fsutil", "startup", "__init__"}  # every floor


def floor_of(top: str) -> int | None:
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    return None


def top_level(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement names, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def imported_packages(path: Path) -> set[str]:
    """The fipo_trainer sub-packages (or top-level modules) a file imports."""
    parts = (name.split(".") for name in imported_modules(path))
    return {p[1] for p in parts if p[0] == "fipo_trainer" and len(p) > 1}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (max {MAX_LINES})"


def test_floors_have_no_back_arrows():
    problems = []
    for path in MODULES:
        own = floor_of(top_level(path))
        if own is None:
            continue
        for target in imported_packages(path) - BASE:
            theirs = floor_of(target)
            if theirs is not None and theirs < own:
                problems.append(f"{path.relative_to(PACKAGE)} imports fipo_trainer.{target}")
    assert not problems, "imports that point up a floor:\n" + "\n".join(problems)


def test_method_name_strings_and_worker_handles_stay_in_cluster():
    pattern = re.compile(r"\.workers\b|execute_all\(|execute_rank\(|execute_per_rank\(")
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in MODULES
        if top_level(p) != "cluster" and pattern.search(p.read_text())
    ]
    assert not offenders, f"worker handles / method-name calls outside cluster/: {offenders}"


def test_force_cpu_is_read_only_by_the_platform_module():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in MODULES
        if p.name != "platform.py" and "FIPO_FORCE_CPU" in p.read_text()
    ]
    assert not offenders, f"FIPO_FORCE_CPU read outside platform.py: {offenders}"


def test_cuda_is_asked_only_through_the_platform_module():
    pattern = re.compile(r"torch\.cuda\.(is_available|device_count)|nvidia-smi")
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in MODULES
        if p.name != "platform.py" and pattern.search(p.read_text())
    ]
    assert not offenders, f"CPU/CUDA decided outside platform.py: {offenders}"


def test_vllm_is_imported_by_its_engine_adapter_only():
    """vLLM's API moves between releases (PEERS.md: version coupling); one module follows
    it, and the factory only checks that it imports."""
    allowed = {"rollout/vllm_engine.py", "rollout/factory.py"}
    users = {
        str(p.relative_to(PACKAGE))
        for p in MODULES
        if any(m == "vllm" or m.startswith("vllm.") for m in imported_modules(p))
    }
    assert users <= allowed, f"vLLM imported outside its adapter: {sorted(users - allowed)}"
    assert "rollout/vllm_engine.py" in users
