"""fsutil manifests (sizes + sha256, nested manifests) and remove_leftovers' report."""

from __future__ import annotations

import hashlib
import json

import pytest

from fipo_trainer.fsutil import (
    MANIFEST_FILE,
    ManifestError,
    ManifestMissing,
    remove_leftovers,
    verify_manifest,
    write_manifest,
)


def _tree(root):
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"abc")
    (root / "sub" / "deep" / "b.txt").write_text("hello")
    return root


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    root = _tree(tmp_path / "d")
    write_manifest(root)
    files = json.loads((root / MANIFEST_FILE).read_text())["files"]
    assert files == {
        "a.bin": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
        "sub/deep/b.txt": {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
    }
    assert verify_manifest(root) == 2
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # atomic, no temp


def test_nested_manifest_is_covered_and_verified_recursively(tmp_path):
    root = _tree(tmp_path / "d")
    write_manifest(root / "sub")
    write_manifest(root)
    assert set(json.loads((root / MANIFEST_FILE).read_text())["files"]) == {
        "a.bin",
        f"sub/{MANIFEST_FILE}",
    }
    assert verify_manifest(root) == 3
    (root / "sub" / "deep" / "b.txt").write_text("HELLO")  # same size, other bytes
    with pytest.raises(ManifestError) as err:
        verify_manifest(root)
    assert err.value.problems == ["sub/deep/b.txt has a different sha256 than the manifest"]
    assert verify_manifest(root, checksums=False) == 3  # sizes still match


def test_verify_names_missing_and_resized_files(tmp_path):
    root = _tree(tmp_path / "d")
    with pytest.raises(ManifestMissing):
        verify_manifest(root)
    write_manifest(root)
    (root / "a.bin").write_bytes(b"a")
    (root / "sub" / "deep" / "b.txt").unlink()
    with pytest.raises(ManifestError) as err:
        verify_manifest(root, checksums=False)
    assert err.value.problems == [
        "a.bin has 1 bytes, the manifest says 3",
        "sub/deep/b.txt is missing",
    ]
    (root / MANIFEST_FILE).write_text("[]")
    with pytest.raises(ManifestError, match="unreadable"):
        verify_manifest(root)


def test_remove_leftovers_reports_what_it_removed(tmp_path):
    (tmp_path / ".tmp-x-1").mkdir()
    (tmp_path / ".old-y-2").write_text("")
    (tmp_path / "keep").mkdir()
    assert [p.name for p in remove_leftovers(tmp_path)] == [".old-y-2", ".tmp-x-1"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
    assert remove_leftovers(tmp_path / "absent") == []
