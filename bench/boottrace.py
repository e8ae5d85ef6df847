"""Record a real VM boot's block reads, and replay them against a disk.

Recording boots the guest once under QEMU (TCG) straight from its image file with QEMU's
``blk_co_preadv`` trace event and message timestamps on, so every read the guest's virtio
disk issued is logged with the time it was issued. The result is cached beside the image:

``<image>.boot-trace.json``: ``{"version": 1, "image_size", "reads": [[offset, length], …],
"issued_at": [seconds since the first read, …], "boot_s": wall time to the marker}``

(``version``/``image_size``/``reads`` is also the prefetch trace format of
``virtman.prefetch``; ``issued_at`` and ``boot_s`` are extra keys for the replay.)

Replaying reads the same extents in the same order from a file (a node's origin, a local
copy, an on-demand path) and waits between reads as the guest did: the gap between two
reads in the recording is the guest's CPU time (reads from a local file took microseconds).
So a replay on many nodes at once stands for many VMs booting on separate machines, which
this 2-core machine could not run as real TCG guests without CPU time dominating the
figures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TRACE_LINE = re.compile(
    r"^\d+@(?P<t>\d+\.\d+):blk_co_preadv .* offset (?P<off>\d+) bytes (?P<len>\d+) flags"
)
MARKER = "VMT-BOOTED"


@dataclass(frozen=True)
class BootTrace:
    image_size: int
    reads: list[tuple[int, int]]
    issued_at: list[float]
    boot_s: float

    @property
    def read_bytes(self) -> int:
        return sum(length for _, length in self.reads)

    @property
    def unique_bytes(self) -> int:
        """Bytes of the image the boot touches (4 KiB granularity)."""
        pages: set[int] = set()
        for offset, length in self.reads:
            pages.update(range(offset >> 12, (offset + length + 4095) >> 12))
        return len(pages) << 12

    def save(self, path: Path) -> None:
        data = {
            "version": 1,
            "image_size": self.image_size,
            "reads": [list(r) for r in self.reads],
            "issued_at": self.issued_at,
            "boot_s": self.boot_s,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> BootTrace:
        data = json.loads(path.read_text())
        if data.get("version") != 1 or len(data["reads"]) != len(data["issued_at"]):
            raise ValueError(f"{path}: not a version 1 boot trace")
        return cls(
            int(data["image_size"]),
            [(int(o), int(n)) for o, n in data["reads"]],
            [float(t) for t in data["issued_at"]],
            float(data["boot_s"]),
        )


def record(
    image: Path, kernel: Path, initrd: Path, cmdline: str, *, memory_mib: int = 256
) -> BootTrace:
    """Boot the guest once from ``image`` (kept pristine: ``snapshot=on``) and trace it."""
    log = image.with_name(image.name + ".trace.log")
    console = image.with_name(image.name + ".trace.console")
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib),
        "-smp", "1", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-drive", f"file={image},format=raw,if=virtio,snapshot=on",
        "-nographic", "-no-reboot", "-nic", "none", "-msg", "timestamp=on",
        "-trace", f"enable=blk_co_preadv,file={log}",
    ]  # fmt: skip
    started = time.monotonic()
    with open(console, "wb") as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=600, check=True)
    boot_s = time.monotonic() - started
    if MARKER not in console.read_text(errors="replace"):
        raise RuntimeError(f"the traced boot printed no {MARKER}; see {console}")
    reads, times = [], []
    for line in log.read_text().splitlines():
        match = TRACE_LINE.match(line)
        if match:
            reads.append((int(match["off"]), int(match["len"])))
            times.append(float(match["t"]))
    if not reads:
        raise RuntimeError(f"no reads traced in {log}")
    log.unlink()
    console.unlink()
    issued = [t - times[0] for t in times]
    return BootTrace(image.stat().st_size, reads, issued, boot_s)


def cached_trace(image: Path, kernel: Path, initrd: Path, cmdline: str) -> BootTrace:
    path = image.with_name(image.name + ".boot-trace.json")
    if path.exists() and path.stat().st_mtime >= image.stat().st_mtime:
        return BootTrace.load(path)
    trace = record(image, kernel, initrd, cmdline)
    trace.save(path)
    return trace


def replay(path: str, trace: BootTrace, *, speed: float = 1.0) -> float:
    """Read ``trace``'s extents from ``path`` in order, keeping the recorded gaps (divided by
    ``speed``); returns the seconds it took. Readahead is off: only the traced bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        started = time.monotonic()
        for (offset, length), at in zip(trace.reads, trace.issued_at, strict=True):
            delay = started + at / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            done = 0
            while done < length:
                chunk = os.pread(fd, length - done, offset + done)
                if not chunk:
                    raise OSError(f"{path}: short read at {offset + done}")
                done += len(chunk)
        return time.monotonic() - started
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """``boottrace.py replay TRACE PATH [SPEED]``: replay, print the seconds as JSON."""
    if len(argv) < 3 or argv[0] != "replay":
        print("usage: boottrace.py replay TRACE PATH [SPEED]", file=sys.stderr)
        return 2
    trace = BootTrace.load(Path(argv[1]))
    seconds = replay(argv[2], trace, speed=float(argv[3]) if len(argv) > 3 else 1.0)
    print(json.dumps({"seconds": seconds, "bytes": trace.read_bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
