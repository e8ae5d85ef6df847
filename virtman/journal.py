"""What virtman has built, on disk, so that a restart adopts or cleans it.

One JSON document, replaced atomically (write, fsync, rename) on every change.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, dict[str, Any]] = {"images": {}, "instances": {}}
        if path.exists():
            loaded = json.loads(path.read_text())
            self.data["images"].update(loaded.get("images", {}))
            self.data["instances"].update(loaded.get("instances", {}))

    def images(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return json.loads(json.dumps(self.data["images"]))

    def instances(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return json.loads(json.dumps(self.data["instances"]))

    def put(self, kind: str, name: str, record: dict[str, Any]) -> None:
        with self.lock:
            self.data[kind][name] = record
            self._write()

    def drop(self, kind: str, name: str) -> None:
        with self.lock:
            if self.data[kind].pop(name, None) is not None:
                self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
