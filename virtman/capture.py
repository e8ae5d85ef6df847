"""Capture: one instance's disk (its base image + its writes), flattened into a NEW base
image file that this node exports as an image target, so that other nodes boot it through
the relay tree with this node as its image server.

The contract (``Virtman.capture``):

* **Quiesced**: the caller makes sure nothing writes to the instance's disk while it is read
  (a guest is paused or stopped: ``GuestBackend.capture`` is pause -> capture -> unpause).
  Virtman reads the disk with ``qemu-img convert -U`` (it does not take the disk's lock: a
  paused guest still holds it) and cannot tell a writer from a paused guest.
* **A new image, immutable**: ``<first image_dir>/<volume-name>.raw``, mode 0444, written
  under a hidden ``.part`` name and linked into place (never over an existing file), then
  exported read-only with the node's CHAP credential, like every image target. The new
  image has its own IQN ``<iqn_prefix>volume-<name>``; its connection names this node's
  portal: the tree of the new image starts at this node (Volt places the first booting
  node under no parent, i.e. reading from this node's target; the original image server
  is not involved).
* **All or nothing**: a failure at any step removes what the earlier steps made (the
  partial file, the file, the target). A name already used by an image target, a recorded
  export, an image of this node or an existing file: ``CaptureExists``, nothing changed.
* **A crash** mid-way leaves at most the hidden partial file: removed at the next start
  (``sweep_partials``) or by the next capture of that name.
* **The instance is not disturbed**: its disk is only read; it keeps running on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brick import values
from brick.exception import BrickError
from brick.executor import execute
from brick.fileio import fsync_dir
from virtman.errors import VirtmanError
from virtman.imageservice import ImageService

LOG = logging.getLogger(__name__)
IMAGE_MODE = 0o444  # a captured image never changes once exported
CONVERT_TIMEOUT_S = 6 * 3600.0


class CaptureExists(VirtmanError):
    code = 1

    def __init__(self, image: str, why: str) -> None:
        self.image = image
        super().__init__(f"Virtman: cannot capture into '{image}': {why}")


class CaptureFailed(VirtmanError):
    def __init__(self, image: str, why: str) -> None:
        self.image = image
        super().__init__(f"Virtman: capture into '{image}' failed: {why}")


@dataclass(frozen=True)
class Captured:
    image: str  # volume-<name>
    path: str  # the new image file
    size: int
    connection: dict[str, Any]  # target_portal / target_iqn / target_lun of this node
    source_image: str | None = None  # the image the instance ran on (volume-<name>)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source_image": self.source_image,
            "target": self.image,
            "path": self.path,
            "size": self.size,
            "connection": dict(self.connection),
        }


def disk_format(path: str) -> str:
    """The format of an instance's disk: the qemu driver's overlays are qcow2 files, the dm
    driver's snapshots raw block devices (given explicitly: never probed)."""
    return "qcow2" if path.endswith(".qcow2") else "raw"


def check_free(service: ImageService, image: str) -> Path:
    """The file the capture of ``image`` will write; ``CaptureExists`` if the name is
    taken anywhere on this node's image service."""
    if not service.image_dirs:
        raise CaptureFailed(image, "this node has no image_dirs to write the image into")
    dest = Path(service.image_dirs[0]) / f"{image}.raw"
    if service.journal is not None and image in service.journal.exports():
        raise CaptureExists(image, "an image target of that name is recorded on this node")
    try:
        exported = service.list_image_target()
    except BrickError as exc:
        raise CaptureFailed(image, f"cannot list the image targets: {exc}") from None
    if image in exported:
        raise CaptureExists(image, "an image target of that name exists on this node")
    if os.path.lexists(dest):
        raise CaptureExists(image, f"the file {dest} exists (never overwritten)")
    return dest


def capture(
    service: ImageService,
    *,
    source: str,
    image: str,
    host_ip: str,
    iscsi_port: int,
) -> Captured:
    """Flatten ``source`` (an instance's disk) into the new image ``image`` and export it;
    undoes every step on failure."""
    dest = check_free(service, image)
    if not dest.parent.is_dir():
        raise CaptureFailed(image, f"the image directory {dest.parent} does not exist")
    part = dest.with_name(f".{dest.name}.part")
    try:
        part.unlink(missing_ok=True)  # a crashed capture's leftover of the same name
        execute(
            [
                "qemu-img",
                "convert",
                "-q",
                "-U",
                "-f",
                disk_format(source),
                "-O",
                "raw",
                source,
                str(part),
            ],
            timeout_s=CONVERT_TIMEOUT_S,
        )
        os.chmod(part, IMAGE_MODE)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.link(part, dest)  # FileExistsError if it appeared meanwhile
        fsync_dir(dest.parent)
    except FileExistsError:
        raise CaptureExists(image, f"the file {dest} appeared meanwhile") from None
    except (BrickError, OSError) as exc:
        raise CaptureFailed(image, f"cannot flatten {source}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            part.unlink()
    try:
        result = service.create_image_target(image, str(dest))
        code, _, info = result.partition(":")
        if code == "1":
            raise CaptureExists(image, "an image target of that name appeared meanwhile")
        if code != "0":
            raise CaptureFailed(image, f"cannot export it: {info}")
        size = dest.stat().st_size
    except BaseException:
        _unlink(dest)
        raise
    connection = {
        "target_portal": f"{values.bracket(host_ip)}:{iscsi_port}",
        "target_iqn": f"{service.default_prefix}{image}",
        "target_lun": 1,
    }
    LOG.info("captured %s (%d bytes) from %s; exported at %s", image, size, source, connection)
    return Captured(image, str(dest), size, connection)


def discard(service: ImageService, captured: Captured) -> None:
    """Undo a capture nothing uses yet (its upload failed): its target, then its file.
    ``CaptureFailed`` if the target stays (the file is kept for it)."""
    result = service.destroy_image_target(captured.image)
    if result.partition(":")[0] not in ("0", "1"):
        raise CaptureFailed(captured.image, f"cannot remove its target: {result[2:]}")
    _unlink(Path(captured.path))
    LOG.info("discarded the capture %s (%s)", captured.image, captured.path)


def sweep_partials(service: ImageService) -> list[str]:
    """Remove the partial files of captures a crash interrupted (at start); their names."""
    if not service.image_dirs:
        return []
    removed = []
    for part in sorted(Path(service.image_dirs[0]).glob(".volume-*.raw.part")):
        if part.is_file() and not part.is_symlink():
            _unlink(part)
            removed.append(str(part))
            LOG.warning("removed %s: a capture that did not finish", part)
    return removed


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        LOG.error("could not remove %s after a failed capture: %s", path, exc)
