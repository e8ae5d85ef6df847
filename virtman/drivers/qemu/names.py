"""Deterministic names of everything the qemu driver makes for an image or an instance.

QMP node names allow 1-32 characters of ``[A-Za-z0-9_-]``; image names may be longer, so
nodes carry a hash of the image name, and the files keep the image name for operators.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from virtman.layers.base import Endpoint

OWNER = "vmt"  # every node and export of ours starts with it
NODE = re.compile(rf"{OWNER}([0-9a-f]{{10}})([a-z]+)([0-9a-f]*)")


def image_tag(image: str) -> str:
    return hashlib.sha256(image.encode()).hexdigest()[:10]


class ImageNames:
    def __init__(self, image: str, *, cache_dir: Path, run_dir: Path) -> None:
        tag = OWNER + image_tag(image)
        self.image = image
        self.quorum = tag + "q"
        self.cache_file_node = tag + "cf"
        self.cache = tag + "c"
        self.cor = tag + "r"
        self.fuse_export = tag + "fuse"
        self.nbd_export = tag + "nbd"
        self.cache_file = cache_dir / f"{image}.qcow2"
        self.fuse_file = run_dir / "exports" / f"{image}.raw"

    def path(self, endpoint: Endpoint) -> str:
        return self.quorum[:-1] + "p" + endpoint.short_id
