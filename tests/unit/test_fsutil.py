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
