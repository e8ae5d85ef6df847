"""Privileged entry points that write kernel knobs: one pattern per knob, values checked.

``KNOBS`` is the whole list: a knob path matches exactly one pattern (``re.fullmatch``, no
``..``, no symlink games: the patterns name fixed directories and kernel names such as
``dm-3``), and the value must match that knob's own pattern. Refusals raise
:class:`brick.exception.NotPermitted`.
"""

from __future__ import annotations

import re

from brick.exception import NotPermitted
from brick.privileged import vmt_root

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_DM_KNAME = r"dm-\d{1,7}"
_FS_BCACHE = r"/sys/fs/bcache"
# the devices the dm driver registers with bcache (virtman/drivers/dm/names.py)
_BCACHE_DEVICE = r"/dev/mapper/(?:vmt_cacheset|cachebk_[A-Za-z0-9_.-]{1,64})"

# knob path pattern -> (value pattern, why). Keep docs/privsep.rst's table in step.
KNOBS: dict[str, tuple[str, str]] = {
    r"/sys/class/bdi/\d{1,10}:\d{1,10}/read_ahead_kb": (
        r"\d{1,9}",
        "readahead window of a FUSE export (qemu-storage-daemon set_readahead)",
    ),
    rf"{_FS_BCACHE}/register_quiet": (
        _BCACHE_DEVICE,
        "bcache: register the dm driver's cache set or an image's backing device",
    ),
    rf"/sys/block/{_DM_KNAME}/bcache/attach": (
        _UUID,
        "bcache: attach a backing device to the cache set",
    ),
    rf"/sys/block/{_DM_KNAME}/bcache/(?:detach|stop)": (
        r"1",
        "bcache: detach or stop an image's backing device",
    ),
    rf"/sys/block/{_DM_KNAME}/bcache/sequential_cutoff": (
        r"0",
        "bcache: cache sequential reads too",
    ),
    rf"{_FS_BCACHE}/{_UUID}/congested_(?:read|write)_threshold_us": (
        r"0",
        "bcache: never bypass the cache set because it looks congested",
    ),
    rf"{_FS_BCACHE}/{_UUID}/unregister": (
        r"1",
        "bcache: unregister the cache set at teardown",
    ),
}


def check_knob(path: str, value: str) -> None:
    """:class:`NotPermitted` unless ``path`` is an allow-listed knob and ``value`` fits it."""
    if not isinstance(path, str) or not isinstance(value, str):
        raise NotPermitted("write_knob", repr(path), "path and value must be str")
    for pattern, (value_pattern, _why) in KNOBS.items():
        if re.fullmatch(pattern, path):
            if not re.fullmatch(value_pattern, value):
                raise NotPermitted("write_knob", value, f"{path} takes {value_pattern}")
            return
    raise NotPermitted("write_knob", path, "not an allow-listed kernel knob")


@vmt_root.entrypoint
def write_knob(path: str, value: str) -> None:
    """Write ``value`` (plus a newline, as ``echo`` does) to the allow-listed knob ``path``."""
    check_knob(path, value)
    with open(path, "w") as f:
        f.write(f"{value}\n")
