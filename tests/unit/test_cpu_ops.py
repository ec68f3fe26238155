"""DeepSpeed's CPU comm op is built at set-up (``fipo_trainer.cpu_ops``), and a run that
would still compile it says so first. Before this module a fresh checkout's first run spent
≈ 35 s of its start-up compiling, with nothing in the log but "still waiting"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fipo_trainer import cpu_ops
from fipo_trainer.platform import EXTENSIONS_DIR_ENV

REPO = Path(__file__).resolve().parents[2]


def fake_build(root: Path) -> Path:
    """What torch's cpp_extension leaves behind: ``<root>/<op>/<op>.so``."""
    library = root / cpu_ops.SHM_COMM_OP / f"{cpu_ops.SHM_COMM_OP}.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"\x7fELF")
    return library


def test_built_op_finds_the_library_torch_leaves(tmp_path: Path) -> None:
    assert cpu_ops.built_op(tmp_path) is None
    (tmp_path / cpu_ops.SHM_COMM_OP).mkdir()
    (tmp_path / cpu_ops.SHM_COMM_OP / "shm.o").write_bytes(b"")  # a build cut short
    assert cpu_ops.built_op(tmp_path) is None
    library = tmp_path / cpu_ops.SHM_COMM_OP / f"{cpu_ops.SHM_COMM_OP}.so"
    library.write_bytes(b"\x7fELF")
    assert cpu_ops.built_op(tmp_path) == library


def test_a_run_that_would_compile_says_where_and_how_to_build_ahead(tmp_path: Path) -> None:
    env = {EXTENSIONS_DIR_ENV: str(tmp_path)}
    message = cpu_ops.pending_build_message(env)
    assert message is not None
    assert str(tmp_path) in message and "python -m fipo_trainer.cpu_ops" in message
    fake_build(tmp_path)
    assert cpu_ops.pending_build_message(env) is None


def run_module(extensions_dir: Path) -> subprocess.CompletedProcess[str]:
    check = (
        "import sys; from fipo_trainer import cpu_ops; code = cpu_ops.main(); "
        "print('deepspeed imported:', 'deepspeed' in sys.modules); sys.exit(code)"
    )
    env = {**os.environ, EXTENSIONS_DIR_ENV: str(extensions_dir)}
    return subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, cwd=REPO
    )


def test_set_up_leaves_a_built_op_alone_without_importing_deepspeed(tmp_path: Path) -> None:
    """setup.sh runs the module on every call, so an installed tree must stay fast."""
    library = fake_build(tmp_path)
    done = run_module(tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"already built: {library}" in done.stdout
    assert "deepspeed imported: False" in done.stdout


def test_setup_sh_builds_the_op_with_the_path_runs_use() -> None:
    """quickstart.sh and test.sh put .venv/bin first on PATH after set-up; the build
    directory is keyed by the ninja found there, so the prebuild must see the same PATH."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert 'PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m fipo_trainer.cpu_ops' in text
    calls = [line.strip() for line in text.splitlines() if line.strip() == "prebuild_cpu_ops"]
    assert len(calls) == 2  # an installed tree (stamp up to date) and a fresh install
    for script in ("quickstart.sh", "test.sh"):
        body = (REPO / "scripts" / script).read_text()
        assert body.index("bash scripts/setup.sh") < body.index(
            'export PATH="$ROOT/.venv/bin:$PATH"'
        )


@pytest.mark.skipif(cpu_ops.current_platform().is_cuda, reason="a CPU op")
def test_the_actor_group_says_so_before_its_ranks_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ranks are this project's WorkerGroup; a recorder stands in for it here (no Ray):
    what is checked is that the log line comes first, and only while the op is missing."""
    from fipo_trainer.actor import group

    started: list[int] = []

    class Recorder:
        def __init__(self, *args: object, **kwargs: object) -> None:
            started.append(len(caplog.records))

    monkeypatch.setattr(group, "WorkerGroup", Recorder)
    monkeypatch.setenv(EXTENSIONS_DIR_ENV, str(tmp_path))
    config = {"model_path": str(tmp_path / "model")}
    with caplog.at_level("INFO", logger=group.__name__):
        group.ActorGroup(config, 1, wait=False)
        fake_build(tmp_path)
        group.ActorGroup(config, 1, wait=False)
    pending = [r for r in caplog.records if cpu_ops.SHM_COMM_OP in r.getMessage()]
    assert len(pending) == 1 and str(tmp_path) in pending[0].getMessage()
    assert started == [1, 1]  # logged before the first group started; nothing the second time
