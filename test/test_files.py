"""io.files.atomic_write: all or nothing, no temporary left behind, ordinary permissions."""
from __future__ import annotations

import os
import stat

import pytest

from megaloc_ros.io import files
from megaloc_ros.io.files import atomic_write, file_sha256


def test_replaces_the_file_and_leaves_nothing_else(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    with atomic_write(p) as f:
        f.write(b"new")
        assert p.read_bytes() == b"old"  # nothing visible before the end
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.bin"]
    with atomic_write(tmp_path / "t.json", "w") as f:
        f.write("{}")
    assert (tmp_path / "t.json").read_text() == "{}"


def test_a_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write(b"half")
            raise RuntimeError("writer failed")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError):
        with atomic_write(p) as f:
            f.write(b"new")
    monkeypatch.undo()
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
    with pytest.raises(OSError):
        with atomic_write(tmp_path / "missing" / "a.bin") as f:
            f.write(b"x")


def test_mode_is_0644_less_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "a") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o640
    with atomic_write(tmp_path / "b") as f:
        f.write(b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o644 & ~old
    with pytest.raises(ValueError):
        with atomic_write(tmp_path / "c", "a"):
            pass


def test_sha256(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    assert file_sha256(tmp_path / "x") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
