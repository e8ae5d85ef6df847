"""The one file per image that lists its upstream paths (``run_dir/paths/<image>.json``).

Both drivers' upstream layers record here which endpoints an image reads from, in read
order, so that a restarted virtman knows them (``UpstreamLayer.endpoints``) and finds the
images that have paths (``Driver.images``). Written atomically, private to root.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from brick.fileio import atomic_write, private_dir
from virtman.layers.base import Endpoint


class PathsFiles:
    def __init__(self, run_dir: Path) -> None:
        self.directory = run_dir / "paths"

    def file(self, image: str) -> Path:
        return self.directory / f"{image}.json"

    def load(self, image: str) -> list[Endpoint]:
        """The endpoints recorded for ``image``, in read order (none: ``[]``)."""
        path = self.file(image)
        if not path.exists():
            return []
        return [Endpoint(**e) for e in json.loads(path.read_text())]

    def save(self, image: str, endpoints: Sequence[Endpoint]) -> None:
        private_dir(self.directory)
        atomic_write(self.file(image), json.dumps([asdict(e) for e in endpoints]))

    def remove(self, image: str) -> None:
        self.file(image).unlink(missing_ok=True)

    def images(self) -> set[str]:
        """Images that have a paths file."""
        return {p.stem for p in self.directory.glob("*.json")}
