"""Durable, private state files and directories.

``atomic_write`` replaces a file so that a crash or a power cut leaves either the old or
the new content, never a torn or empty file: the data is written to a temporary file next
to it, fsynced, renamed over the old one, and the directory is fsynced so that the rename
itself is on disk. ``private_dir`` makes a state directory readable by its owner only.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

LOG = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
T = TypeVar("T")


def fsync_dir(directory: Path | str) -> None:
    """Make the entries of ``directory`` (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes | str, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8) atomically and durably, with ``mode``
    whatever the umask. On failure the old file is left as it was and nothing else stays."""
    raw = data.encode() if isinstance(data, str) else data
    atomic_replace(path, lambda f: f.write(raw), mode)


def atomic_replace(path: Path | str, write: Callable[[BinaryIO], T], mode: int = FILE_MODE) -> T:
    """``atomic_write`` for content streamed by ``write(file)`` (e.g. a large file made
    chunk by chunk); returns what ``write`` returns."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return result


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and missing parents) with mode 0700 whatever the umask. An existing
    directory keeps its mode (the operator chose it) but one that others can read or enter
    is reported once, as a warning."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by someone else: checked below
            continue
        os.chmod(directory, DIR_MODE)
    if path not in missing:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            LOG.warning(
                "%s has mode %04o: other users can read or enter it (state directories "
                "should be 0700; chmod 700 it unless this is intended)",
                path,
                mode,
            )
    return path
