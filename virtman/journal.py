"""What virtman has built, on disk, so that a restart adopts or cleans it.

One JSON document (mode 0600), replaced atomically and durably on every change
(``brick.fileio.atomic_write``). A document that cannot be read is never overwritten:
``Journal`` raises ``JournalCorrupt`` and the daemon does not start (the operator's
recovery is in docs/virtman.rst).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from brick.fileio import atomic_write, private_dir
from virtman.errors import JournalCorrupt

# exports: the image targets of ImageService; guests: virtman.guest.manager
KINDS = ("images", "instances", "exports", "guests")


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        private_dir(path.parent)
        self.data: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            loaded = json.loads(self.path.read_bytes())
        except (UnicodeDecodeError, ValueError) as exc:
            raise JournalCorrupt(self.path, f"not JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise JournalCorrupt(self.path, "not a JSON object")
        for kind in KINDS:
            section = loaded.get(kind, {})
            if not isinstance(section, dict) or not all(
                isinstance(r, dict) for r in section.values()
            ):
                raise JournalCorrupt(self.path, f"{kind!r} is not an object of records")
            self.data[kind].update(section)

    def records(self, kind: str) -> dict[str, dict[str, Any]]:
        """A copy of one section (``KINDS``)."""
        with self.lock:
            copy: dict[str, dict[str, Any]] = json.loads(json.dumps(self.data[kind]))
            return copy

    def images(self) -> dict[str, dict[str, Any]]:
        return self.records("images")

    def instances(self) -> dict[str, dict[str, Any]]:
        return self.records("instances")

    def exports(self) -> dict[str, dict[str, Any]]:
        return self.records("exports")

    def put(self, kind: str, name: str, record: dict[str, Any]) -> None:
        with self.lock:
            self.data[kind][name] = record
            self._write()

    def drop(self, kind: str, name: str) -> None:
        with self.lock:
            if self.data[kind].pop(name, None) is not None:
                self._write()

    def _write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True))
