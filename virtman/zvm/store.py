"""What the z/VM-shaped API records beside the guest manager: imported images and guest
network interfaces, in ``<state_dir>/zvm.json`` (mode 0600, replaced atomically)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from brick.fileio import atomic_write, private_dir
from virtman.errors import JournalCorrupt

SECTIONS = ("images", "nics")


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        private_dir(path.parent)
        self.data: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        if path.exists():
            try:
                loaded = json.loads(path.read_bytes())
            except (UnicodeDecodeError, ValueError) as exc:
                raise JournalCorrupt(path, f"not JSON ({exc})") from None
            if not isinstance(loaded, dict):
                raise JournalCorrupt(path, "not a JSON object")
            for section in SECTIONS:
                value = loaded.get(section, {})
                if not isinstance(value, dict):
                    raise JournalCorrupt(path, f"{section!r} is not an object")
                self.data[section].update(value)

    def get(self, section: str, key: str) -> Any:
        with self.lock:
            value = self.data[section].get(key)
            return None if value is None else json.loads(json.dumps(value))

    def all(self, section: str) -> dict[str, Any]:
        with self.lock:
            copy: dict[str, Any] = json.loads(json.dumps(self.data[section]))
            return copy

    def put(self, section: str, key: str, value: Any) -> None:
        with self.lock:
            self.data[section][key] = value
            atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def drop(self, section: str, key: str) -> None:
        with self.lock:
            if self.data[section].pop(key, None) is not None:
                atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True))
