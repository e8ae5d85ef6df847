"""brick.fileio: durable atomic replaces and private state directories (issue 10)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from brick import fileio


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:
    """What os.fsync was called on, in order: "dir" or "file"."""
    seen: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        seen.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(fileio.os, "fsync", record)
    return seen


def test_issue_10_atomic_write_fsyncs_the_file_then_its_directory(tmp_path, fsyncs) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    fileio.atomic_write(target, '{"new": 1}')
    assert target.read_text() == '{"new": 1}'
    assert fsyncs == ["file", "dir"]
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left


def test_issue_10_atomic_write_mode_is_0600_whatever_the_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        fileio.atomic_write(tmp_path / "a", b"x")
        fileio.atomic_write(tmp_path / "b", b"y", mode=0o640)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a") == 0o600
    assert _mode(tmp_path / "b") == 0o640


def test_issue_10_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "journal.json"
    target.write_text("old")

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["journal.json"]


def test_issue_10_private_dir_creates_0700_and_warns_on_open_ones(tmp_path, caplog) -> None:
    old = os.umask(0)
    try:
        made = fileio.private_dir(tmp_path / "state" / "cache")
    finally:
        os.umask(old)
    assert _mode(made) == 0o700 and _mode(made.parent) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="brick.fileio"):
        fileio.private_dir(open_dir)
        fileio.private_dir(made)
    assert _mode(open_dir) == 0o755  # the operator's choice is kept
    assert [r.getMessage()[: len(str(open_dir)) + 14] for r in caplog.records] == [
        f"{open_dir} has mode 0755"
    ]
