"""Privileged entry points that write kernel knobs: one pattern per knob, values checked."""

from __future__ import annotations

import re

from brick.exception import NotPermitted
from brick.privileged import vmt_root

# knob path pattern -> (value pattern, why)
KNOBS: dict[str, tuple[str, str]] = {
    r"/sys/class/bdi/\d{1,10}:\d{1,10}/read_ahead_kb": (
        r"\d{1,9}",
        "readahead window of a FUSE export (qemu-storage-daemon set_readahead)",
    ),
}


@vmt_root.entrypoint
def write_knob(path: str, value: str) -> None:
    """Write ``value`` (plus a newline) to the allow-listed kernel knob ``path``."""
    for pattern, (value_pattern, _why) in KNOBS.items():
        if re.fullmatch(pattern, path):
            if not re.fullmatch(value_pattern, value):
                raise NotPermitted("write_knob", value, f"{path} takes {value_pattern}")
            with open(path, "w") as f:
                f.write(f"{value}\n")
            return
    raise NotPermitted("write_knob", path, "not an allow-listed kernel knob")
