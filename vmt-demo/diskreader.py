"""A reader of a node's image export while faults happen: block after block, with
O_DIRECT (every read reaches the node's stack), its errors counted.

Used by tests/functional/test_bus.py and bench/bus_push.py: a child must read on, with no
error, while its parent dies.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

BLOCK = 64 * 1024


class DiskReader:
    def __init__(self, path: Path, *, start: int = 0, pace_s: float = 0.01) -> None:
        """Reads ``path`` from byte ``start`` (rounded down to a block), one block every
        ``pace_s``, wrapping at its end."""
        self.path = path
        self.start = start - start % BLOCK
        self.pace_s = pace_s
        self.reads = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-reader", daemon=True)

    def __enter__(self) -> DiskReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        try:
            size = os.fstat(fd).st_size
            offset = self.start % size
            while not self._stop.is_set():
                try:
                    os.preadv(fd, [buf], offset)
                    self.reads += 1
                except OSError as exc:
                    self.errors.append(f"read at {offset}: {exc}")
                offset = (offset + BLOCK) % size
                self._stop.wait(self.pace_s)
        finally:
            os.close(fd)
