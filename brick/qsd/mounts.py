"""What the kernel says about mounts (/proc/self/mountinfo, /proc/mounts), and the empty
regular files that serve as FUSE mountpoints."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path


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


def mounted_paths() -> set[str]:
    """Every mount point listed in /proc/mounts (of this mount namespace)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return set()
    return {_unescape_mount_field(line.split()[1]) for line in lines if len(line.split()) > 1}


def remove_empty_file(path: str) -> None:
    """Remove ``path`` if it is an empty regular file (a FUSE mountpoint we made)."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if info.st_size == 0 and (info.st_mode & 0o170000) == 0o100000:
            os.unlink(path)
