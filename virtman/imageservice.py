"""The image server role: export base image files as iSCSI targets (tgtd, CHAP, read-only).

Results keep the original's strings. The original bound each file to a loop device first;
tgtd serves files directly, so ``loop_dev`` is accepted and ignored, and the result's second
field is the exported file: ``"0:<tid>:<file>"``.

Only what the operator allows is exported: regular files whose real path (symlinks and ``..``
resolved) lies inside one of ``image_dirs``, and the block devices listed in
``image_block_devices``. The real path is what tgtd is given.

Every image target is recorded in the node's journal (``exports``): targets live only in
tgtd, so when tgtd dies (or the host restarts) ``restore`` exports them again, with the
same IQN and file (the tid may change).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brick.exception import BrickError
from brick.tgt import Chap, Target, TgtAdm
from virtman import validation
from virtman.errors import InvalidInput
from virtman.journal import Journal
from virtman.layers.base import Revived

LOG = logging.getLogger(__name__)


class NotAllowed(Exception):
    """The export rules (image_dirs, image_block_devices) refuse a path."""


def of_node(virtman: Any, conf: Any) -> ImageService:
    """The image service of a node's ``Virtman`` (its driver's tgtd and CHAP account, its
    journal) under the options of ``conf``: ``image_dirs`` (default
    ``<state_dir>/images``) and ``image_block_devices``; what virtmanserver and Nova's
    ``vmthunder`` driver export images and captures with."""
    settings = virtman.settings
    return ImageService(
        virtman.driver.tgt,
        virtman.driver.chap,
        settings.iqn_prefix,
        conf.image_dirs or [settings.state_dir / "images"],
        conf.image_block_devices,
        journal=virtman.journal,
    )


class ImageService:
    def __init__(
        self,
        tgt: TgtAdm,
        chap: Chap | None,
        default_prefix: str,
        image_dirs: Sequence[Path | str],
        block_devices: Sequence[Path | str] = (),
        journal: Journal | None = None,
    ) -> None:
        self.tgt = tgt
        self.chap = chap
        self.default_prefix = default_prefix
        self.image_dirs = [str(d) for d in image_dirs]
        self.block_devices = [str(d) for d in block_devices]
        self.journal = journal
        self.lock = threading.Lock()

    def create_image_target(
        self,
        image_name: str,
        file_path: str,
        loop_dev: str | None = None,
        iqn_prefix: str | None = None,
    ) -> str:
        try:
            image = validation.image_name(image_name)
            iqn = validation.iqn((iqn_prefix or self.default_prefix) + image, "iqn_prefix")
            path = self._allowed(_absolute(file_path))
        except InvalidInput as err:
            return f"2:{err}"
        except NotAllowed as err:
            LOG.warning("create_image_target %s refused: %.300s", image, err)
            return f"2:ImageService: {err}"
        if path is None:
            return f"2:ImageService: the file {file_path!r} does not exist"
        with self.lock:
            if self._find(image) is not None:
                return f"1:ImageService: the image target '{image}' already exists!"
            try:
                tid = self.tgt.create_target(iqn, path, lun=1, readonly=True, chap=self.chap)
            except BrickError as exc:
                LOG.error("exporting %s failed: %s", image, exc)
                return f"2:ImageService: cannot export {image}: {exc}"
            if self.journal is not None:
                self.journal.put("exports", image, {"iqn": iqn, "path": str(path)})
        LOG.info("exported %s as %s (tid %s)", path, iqn, tid)
        return f"0:{tid}:{path}"

    def destroy_image_target(self, image_name: str) -> str:
        try:
            image = validation.image_name(image_name)
        except InvalidInput as err:
            return f"2:{err}"
        with self.lock:
            target = self._find(image)
            if target is None:
                self._forget(image)  # a record restore could not export: the caller's call
                return f"1:ImageService: the image target '{image}' does not exist!"
            try:
                self.tgt.delete_target(target.iqn)
            except BrickError as exc:
                return f"2:ImageService: cannot remove {image}: {exc}"
            self._forget(image)
        LOG.info("removed the target of %s", image)
        return "0:"

    def restore(self, revived: Revived | None = None) -> int:
        """Export again every recorded image target tgtd does not have (at start, or after
        tgtd died: ``revived.targets``); returns how many. A file that went away or that the
        rules no longer allow is logged and not exported (its record stays until
        ``destroy_image_target``)."""
        if self.journal is None or (revived is not None and not revived.targets):
            return 0
        restored = 0
        with self.lock:
            try:
                targets = self.tgt.targets()
            except BrickError as exc:  # e.g. a dm node whose relays are LIO: no tgtd
                if self.journal.exports():
                    LOG.error("image targets not exported again: tgtd: %s", exc)
                return 0
            if revived is None:
                self._record_unrecorded(targets)
            present = {t.iqn for t in targets}
            for image, record in sorted(self.journal.exports().items()):
                iqn = record.get("iqn")
                if iqn in present:
                    continue
                try:
                    if not isinstance(iqn, str):
                        raise InvalidInput("iqn", iqn, "missing from the record")
                    path = self._allowed(str(record.get("path")))
                    if path is None:
                        raise InvalidInput("file_path", record.get("path"), "does not exist")
                    self.tgt.create_target(iqn, path, lun=1, readonly=True, chap=self.chap)
                except (InvalidInput, NotAllowed, BrickError) as exc:
                    LOG.error("image target of %s not exported again: %s", image, exc)
                    continue
                restored += 1
                LOG.warning("exported %s again as %s (tgtd had lost it)", path, iqn)
        return restored

    def _record_unrecorded(self, targets: list[Target]) -> None:
        """Record the image targets an earlier version exported without a record (a
        target whose file the export rules allow; relays export FUSE files, never that)."""
        assert self.journal is not None
        recorded = {r.get("iqn") for r in self.journal.exports().values()}
        for target in targets:
            image = target.iqn.rpartition(":")[2]
            if target.iqn in recorded or not target.luns or not image.startswith("volume-"):
                continue
            try:
                image = validation.image_name(image)
                path = self._allowed(target.luns[0].backing_path)
            except (InvalidInput, NotAllowed):
                continue
            if path is not None:
                self.journal.put("exports", image, {"iqn": target.iqn, "path": str(path)})
                LOG.info("recorded the image target of %s (exported before records)", image)

    def _forget(self, image: str) -> None:
        if self.journal is not None:
            self.journal.drop("exports", image)

    def readers(self, image_name: str) -> list[str]:
        """The addresses of the initiators reading image target ``image_name`` now (other
        nodes booting it); [] if there is no such target."""
        image = validation.image_name(image_name)
        target = self._find(image)
        if target is None:
            return []
        return sorted({c.address for c in self.tgt.connections(target.iqn)})

    def list_image_target(self) -> dict[str, str]:
        """``{"volume-<name>": "<tid>:<file>"}`` for every image target of this server."""
        result = {}
        for target in self.tgt.targets():
            image = target.iqn.rpartition(":")[2]
            if image.startswith("volume-") and target.luns:
                result[image] = f"{target.tid}:{target.luns[0].backing_path}"
        return result

    def _find(self, image: str) -> Target | None:
        for target in self.tgt.targets():
            if target.iqn.rpartition(":")[2] == image:
                return target
        return None

    def _allowed(self, given: str) -> Path | None:
        """The real path of ``given`` if the rules allow exporting it (None: no such file);
        ``NotAllowed`` naming the rule otherwise."""
        real = os.path.realpath(given)
        try:
            info: os.stat_result | None = os.stat(real)
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise InvalidInput("file_path", given, exc.strerror or str(exc)) from None
        if info is not None and stat.S_ISBLK(info.st_mode):
            if not any(real == os.path.realpath(d) for d in self.block_devices):
                raise NotAllowed(f"{given} is a block device not in image_block_devices")
        elif not any(_inside(real, d) for d in self.image_dirs):
            raise NotAllowed(f"{given} is outside image_dirs ({', '.join(self.image_dirs)})")
        elif info is None:
            return None
        elif not stat.S_ISREG(info.st_mode):
            raise NotAllowed(f"{given} is not a regular file")
        elif info.st_size == 0 or info.st_size % 512:
            raise InvalidInput("file_path", given, "size must be a non-zero multiple of 512 bytes")
        if not os.access(real, os.R_OK):
            raise InvalidInput("file_path", given, "is not readable")
        return Path(real)


def _absolute(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise InvalidInput("file_path", value, "must be an absolute path")
    return value


def _inside(real: str, directory: str) -> bool:
    """Whether ``real`` (a resolved path) is strictly inside ``directory`` (resolved now)."""
    top = os.path.realpath(directory)
    return real != top and os.path.commonpath([real, top]) == top
