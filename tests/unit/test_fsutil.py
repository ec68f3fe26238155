"""The write-then-rename helper: complete or untouched, never half-written."""

from __future__ import annotations

import pytest

from fipo_trainer.fsutil import (
    atomic_dir,
    atomic_file,
    commit_dir,
    discard_dir,
    remove_leftovers,
    tmp_sibling,
)


def test_atomic_dir_replaces_or_leaves_untouched(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists()
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("crash")
    assert (final / "a").read_text() == "1"
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_file_and_leftovers(tmp_path):
    path = tmp_path / "sub" / "x.txt"
    with atomic_file(path) as f:
        f.write("hello")
    with pytest.raises(ValueError), atomic_file(path) as f:
        f.write("half")
        raise ValueError
    assert path.read_text() == "hello"
    assert [p.name for p in path.parent.iterdir()] == ["x.txt"]
    with atomic_file(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00"


def test_shared_tmp_commit_discard_and_cleanup(tmp_path):
    final = tmp_path / "export"
    tmp = tmp_sibling(final)
    tmp.mkdir()
    (tmp / "w").write_text("w")
    commit_dir(tmp, final)
    assert (final / "w").is_file() and not tmp.exists()
    (tmp_path / ".tmp-killed").mkdir()
    (tmp_path / ".old-x").write_text("")
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    discard_dir(final)
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_trains_one_run_at_a_time(tmp_path, monkeypatch, capsys):
    """A second ``fipo-train`` in a run directory in use stops at once, naming the holder's
    pid; it used to append to the same metrics.jsonl and overwrite the same checkpoints."""
    import os

    from fipo_trainer import cli
    from fipo_trainer.fsutil import RunDirInUse, run_dir_lock
    from fipo_trainer.trainer import launch

    ran = []
    monkeypatch.setattr(launch, "launch", ran.append)
    run_dir = tmp_path / "run"
    overrides = ["model.tiny.warm_start_steps=0", f"trainer.run_dir={run_dir}"]
    with run_dir_lock(run_dir):
        pid = os.getpid()
        with pytest.raises(RunDirInUse, match=rf"another fipo-train \(pid {pid}\)"), run_dir_lock(
            run_dir
        ):
            pass
        with pytest.raises(SystemExit) as exited:
            cli._train_task(cli.compose_config(overrides))
        assert exited.value.code == 2 and not ran
        assert f"trainer.run_dir='{run_dir}' is in use" in capsys.readouterr().err
    cli._train_task(cli.compose_config(overrides))  # free again: the run goes ahead
    assert len(ran) == 1


def test_a_refused_run_leaves_the_holders_hydra_record_alone(tmp_path, monkeypatch, capsys):
    """``fipo-train`` locks the run directory before Hydra's main, which writes ``.hydra/``
    and a log there before the task runs: a refused second run used to overwrite the first
    run's ``.hydra/overrides.yaml``. The run that holds the lock does not lock it twice."""
    from fipo_trainer import cli, startup
    from fipo_trainer.fsutil import run_dir_lock
    from fipo_trainer.trainer import launch

    ran = []
    monkeypatch.setattr(launch, "launch", ran.append)
    monkeypatch.setattr(startup, "pause_gc", lambda: None)  # this process keeps its GC
    run_dir = tmp_path / "run"
    record = run_dir / ".hydra" / "overrides.yaml"
    record.parent.mkdir(parents=True)
    record.write_text("- the first run's overrides\n")
    args = ["model.tiny.warm_start_steps=0", f"trainer.run_dir={run_dir}"]
    with run_dir_lock(run_dir):
        with pytest.raises(SystemExit) as exited:
            cli.train_main(args)
        assert exited.value.code == 2 and not ran
        assert f"trainer.run_dir='{run_dir}' is in use" in capsys.readouterr().err
        assert record.read_text() == "- the first run's overrides\n"
        assert sorted(p.name for p in run_dir.iterdir()) == [".fipo-train.lock", ".hydra"]
    cli.train_main(args)  # free again: the run goes ahead, holding the lock once
    assert len(ran) == 1 and "trainer.run_dir" in record.read_text()


def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path, monkeypatch, capsys):
    """``trainer.run_dir`` under a file (or read-only, or on /proc): one line naming the key
    and the fix, exit 2; it was mkdir's traceback."""
    from fipo_trainer import cli, startup
    from fipo_trainer.fsutil import RunDirUnusable, run_dir_lock

    monkeypatch.setattr(startup, "pause_gc", lambda: None)  # this process keeps its GC
    (tmp_path / "a_file").write_text("")
    run_dir = tmp_path / "a_file" / "run"
    with pytest.raises(RunDirUnusable, match="cannot be created or written"), run_dir_lock(
        run_dir
    ):
        pass
    with pytest.raises(SystemExit) as exited:
        cli.train_main(["model.tiny.warm_start_steps=0", f"trainer.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"fipo-train: trainer.run_dir='{run_dir}' cannot be created or written" in err
    assert "set trainer.run_dir to a directory this user can write" in err


def test_a_killed_run_frees_its_run_directory(tmp_path):
    """The lock is the kernel's: SIGKILL of its holder frees it (no stale lock file to
    delete by hand)."""
    import signal
    import subprocess
    import sys

    from fipo_trainer.fsutil import run_dir_lock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom fipo_trainer.fsutil import run_dir_lock\n"
         f"with run_dir_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n"
         "    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with run_dir_lock(tmp_path):
            pass
    finally:
        holder.kill()
