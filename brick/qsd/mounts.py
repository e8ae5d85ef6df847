"""What the kernel says about mounts (/proc/self/mountinfo, /proc/mounts), and the empty
regular files that serve as FUSE mountpoints."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from brick.exception import BrickError
from brick.executor import execute

LOG = logging.getLogger(__name__)


# -- /proc helpers ---------------------------------------------------------------------------
def _unescape_mount_field(text: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_device(path: str) -> str | None:
    """``major:minor`` of the file system mounted at ``path`` (from /proc/self/mountinfo;
    the last mount there wins), or None if nothing is mounted there."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and _unescape_mount_field(fields[4]) == path:
            found = fields[2]
    return found


def _mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) of each line of /proc/mounts (this mount namespace)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    return [
        (_unescape_mount_field(fields[1]), fields[2])
        for fields in (line.split() for line in lines)
        if len(fields) > 2
    ]


def mounted_paths() -> set[str]:
    """Every mount point listed in /proc/mounts (of this mount namespace)."""
    return {path for path, _ in _mounts()}


def fuse_mounts_under(root: Path) -> list[str]:
    """FUSE mount points at or below ``root`` (deepest first), e.g. the exports of
    qemu-storage-daemons that died without unmounting them."""
    prefix = str(root).rstrip("/") + "/"
    found = [
        path
        for path, fstype in _mounts()
        if fstype.startswith("fuse") and (path == str(root) or path.startswith(prefix))
    ]
    return sorted(found, key=len, reverse=True)


def unmount_dead_fuse_exports(root: Path) -> list[str]:
    """Lazily unmount (``fusermount3 -u -z``) every FUSE mount at or below ``root``: for a
    folder whose qemu-storage-daemons were ended without tearing their exports down (a lab's
    sweep, a crash). Returns the mount points; the first failure is raised after trying all."""
    found = fuse_mounts_under(root)
    errors: list[BrickError] = []
    for mountpoint in found:
        LOG.warning("unmounting %s: its FUSE export's daemon is gone", mountpoint)
        try:
            execute(["fusermount3", "-u", "-z", mountpoint], timeout_s=30)
        except BrickError as exc:
            errors.append(exc)
    if errors:
        for other in errors[1:]:
            errors[0].add_note(f"also: {other}")
        raise errors[0]
    return found


def remove_empty_file(path: str) -> None:
    """Remove ``path`` if it is an empty regular file (a FUSE mountpoint we made)."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if info.st_size == 0 and (info.st_mode & 0o170000) == 0o100000:
            os.unlink(path)
