"""JIT-built ops (DeepSpeed's shm comm op) get one build directory per build inputs.

Why: torch builds an op in ``<root>/<name>`` whatever the flags, so two checkouts (or two
compiler settings) on one machine rebuilt the same directory each time their runs
alternated (29-87 s on 2 cores). The old behaviour had no ``TORCH_EXTENSIONS_DIR`` in the
worker env: every test below that asks for one fails on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fipo_trainer import platform as plat


def test_worker_env_sets_a_keyed_extensions_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    env = plat.worker_env()
    root = Path(env["TORCH_EXTENSIONS_DIR"])
    assert root.name.startswith("fipo-") and root.parent.name == "torch_extensions"
    assert env["TORCH_EXTENSIONS_DIR"] == plat.worker_env()["TORCH_EXTENSIONS_DIR"]  # stable


def test_different_compiler_flags_get_different_dirs() -> None:
    base = {"XDG_CACHE_HOME": "/c"}
    a = plat.torch_extensions_dir(base)
    b = plat.torch_extensions_dir({**base, "CXXFLAGS": "-O3 -march=native"})
    c = plat.torch_extensions_dir({**base, "CXX": "clang++"})
    assert len({a, b, c}) == 3
    assert a == plat.torch_extensions_dir(dict(base))
    assert a.startswith("/c/torch_extensions/")


def test_another_install_gets_another_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second checkout = another DeepSpeed/torch path in the include flags."""
    env = {"XDG_CACHE_HOME": "/c"}
    here = plat.torch_extensions_dir(env)
    real = plat._package_dir
    plat._build_key.cache_clear()
    monkeypatch.setattr(
        plat,
        "_package_dir",
        lambda name: "/other/venv/" + name if name == "deepspeed" else real(name),
    )
    try:
        assert plat.torch_extensions_dir(env) != here
    finally:
        plat._build_key.cache_clear()


def test_another_ninja_gets_another_dir(tmp_path: Path) -> None:
    """Two ninja versions disagree on a build's command hash, so each rebuilt the other's
    objects ("ninja explain: command line changed"): the venv's vs the system's on PATH."""
    dirs = []
    for name in ("a", "b"):
        bin_dir = tmp_path / name
        bin_dir.mkdir()
        ninja = bin_dir / "ninja"
        ninja.write_text("#!/bin/sh\n")
        ninja.chmod(0o755)
        dirs.append(plat.torch_extensions_dir({"XDG_CACHE_HOME": "/c", "PATH": str(bin_dir)}))
    assert dirs[0] != dirs[1]
    same = plat.torch_extensions_dir({"XDG_CACHE_HOME": "/c", "PATH": str(tmp_path / "a")})
    assert same == dirs[0]


def test_user_setting_wins() -> None:
    assert plat.torch_extensions_dir({"TORCH_EXTENSIONS_DIR": "/mine"}) == "/mine"


def test_torch_builds_the_op_under_the_keyed_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch's cpp_extension (DeepSpeed's builder) will build the shm comm op."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    keyed = plat.worker_env()["TORCH_EXTENSIONS_DIR"]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", keyed)
    build = cpp_extension._get_build_directory("deepspeed_shm_comm", verbose=False)
    assert os.path.dirname(build) == keyed
