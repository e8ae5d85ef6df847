"""A root disk that is a VMThunder snapshot: ``Virtman.create()`` is its clone.

Modelled on Nova's ``Rbd`` backend: ``SUPPORTS_CLONE``, so Nova's spawn calls ``clone()``
instead of downloading the image; the clone is the node's copy-on-write disk over the image
streamed through the relay tree. The image's iSCSI location comes from its Glance
properties ``vmthunder_target_portal``, ``vmthunder_target_iqn`` and (optional)
``vmthunder_target_lun``. The disk is a block device (dm driver: raw) or a file (qemu
driver: qcow2 over the stack), as the node's driver makes it.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from nova.image import glance
from nova.virt.libvirt import imagebackend

from nova import exception
from nova.virt import images

IMAGE_API = glance.API()
PROPERTY = "vmthunder_target_"


def connection_of(image_meta: dict[str, Any]) -> dict[str, Any] | None:
    """The image's iSCSI connection (Virtman's ``image_connections``) from its properties."""
    props = image_meta.get("properties") or {}
    portal, iqn = props.get(PROPERTY + "portal"), props.get(PROPERTY + "iqn")
    if not portal or not iqn:
        return None
    return {
        "target_portal": portal,
        "target_iqn": iqn,
        "target_lun": int(props.get(PROPERTY + "lun", 1)),
    }


def properties_of(connection: dict[str, Any]) -> dict[str, str]:
    """The Glance properties naming an image's iSCSI connection (``connection_of``'s input)."""
    return {
        PROPERTY + "portal": str(connection["target_portal"]),
        PROPERTY + "iqn": str(connection["target_iqn"]),
        PROPERTY + "lun": str(connection.get("target_lun", 1)),
    }


def _disk_kind(path: str | None) -> tuple[str, str]:
    """(libvirt source type, driver format) of a disk Virtman made."""
    if path and os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
        return "block", "raw"
    return "file", "qcow2"


class VMThunderImage(imagebackend.Image):
    SUPPORTS_CLONE = True
    virtman_of: Any = None  # set by the driver: () -> the node's Virtman

    def __init__(self, instance=None, disk_name=None, path=None, disk_info_mapping=None):
        self.instance_name = instance.name if instance is not None else os.path.basename(path)
        self.disk_name = disk_name or "disk"
        path = path or self._made_path()
        source_type, driver_format = _disk_kind(path)
        super().__init__(
            path or "",
            source_type,
            driver_format,
            is_block_dev=source_type == "block",
            disk_info_mapping=disk_info_mapping,
        )

    # -- the disk Virtman made ----------------------------------------------------------
    def _virtman(self) -> Any:
        return type(self).virtman_of()

    def _made_path(self) -> str | None:
        record = self._virtman().journal.instances().get(self.instance_name) or {}
        return record.get("path")

    def _refresh(self) -> None:
        self.path = self._made_path() or ""
        self.source_type, self.driver_format = _disk_kind(self.path)
        self.is_block_dev = self.source_type == "block"

    def exists(self) -> bool:
        return bool(self._made_path())

    def _can_fallocate(self) -> bool:
        return False

    def get_disk_size(self, name: str) -> int:
        return images.qemu_img_info(self.path, self.driver_format).virtual_size

    # -- Nova's spawn ---------------------------------------------------------------------
    def clone(self, context, image_id_or_uri):
        image_meta = IMAGE_API.get(context, image_id_or_uri)
        connection = connection_of(image_meta)
        if connection is None:
            raise exception.ImageUnacceptable(
                image_id=image_id_or_uri, reason="no vmthunder_target_portal/iqn properties"
            )
        if image_meta.get("disk_format") not in ("raw", None):
            raise exception.ImageUnacceptable(image_id=image_id_or_uri, reason="not raw")
        result = self._virtman().create(self.instance_name, str(image_id_or_uri), connection)
        code, _, info = result.partition(":")
        if code != "0":
            raise exception.ImageUnacceptable(image_id=image_id_or_uri, reason=f"Virtman: {info}")
        self._refresh()

    def create_image(self, prepare_template, base, size, safe=False, *args, **kwargs):
        if not self.exists():
            # Nova's clone_fallback_to_fetch: our clone, or a download when the image has
            # no VMThunder location (refused below: a download has no disk to land in).
            prepare_template(*args, target=base, **kwargs)
        self._refresh()
        if not self.path:
            raise exception.ImageUnacceptable(
                image_id=os.path.basename(base), reason="not a VMThunder image (no clone made)"
            )

    def resize_image(self, size):
        raise exception.ImageUnacceptable(
            image_id=self.instance_name, reason="resize: not supported"
        )

    def snapshot_extract(self, target, out_format):
        images.convert_image(self.path, target, self.driver_format, out_format)

    def get_model(self, connection):
        from nova.virt.image import model

        return (
            model.LocalBlockImage(self.path)
            if self.is_block_dev
            else model.LocalFileImage(self.path, self.driver_format)
        )


class Backend(imagebackend.Backend):
    """Every disk of an instance of this driver comes from ``VMThunderImage``."""

    def backend(self, image_type=None):
        return VMThunderImage
