"""What the ``dm`` driver's layers share, without the driver: the machine's seams
(``Host``), device-mapper, bcache's sysfs, loop devices, the settings, one lock, and the
helpers that tell our dm devices from anybody else's.

The layers are handed a ``DmContext`` instead of the driver, so that no layer module
imports ``driver.py`` (which builds the layers).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brick import executor
from brick.dm import DeviceMapper, Executor, device_number, is_block_device
from brick.exception import BrickError, CommandFailed, NotFound
from brick.iscsi import BY_PATH_DIR
from brick.qsd.daemon import StorageDaemon
from virtman.conf import Settings
from virtman.drivers.dm import bcache
from virtman.drivers.dm.names import parse

LOG = logging.getLogger(__name__)


@dataclass
class Host:
    """The driver's seams to the machine: every command, device check and sysfs access."""

    execute: Executor = executor.execute
    devno: Callable[[str], str] = device_number
    block_device: Callable[[str], bool] = is_block_device
    realpath: Callable[[str], str] = os.path.realpath
    sysfs: Path = Path("/sys")
    by_path_dir: Path = BY_PATH_DIR
    rtslib: Any = None  # rtslib_fb, imported on first use
    io: bcache.DiskIO = field(default_factory=bcache.DiskIO)
    bcache: bcache.BcacheSysfs | None = None  # default: BcacheSysfs(sysfs)
    qsd: StorageDaemon | None = None  # dm_nbd_relay's daemon; default: NbdRelay's own


class Loops:
    """Loop devices over files (``losetup``)."""

    def __init__(self, execute: Executor) -> None:
        self._execute = execute

    def find(self, file: str) -> list[str]:
        """The loop devices attached to ``file`` now."""
        out = self._execute(
            ["losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"]
        ).stdout
        found = []
        for line in out.splitlines():
            name, _, back = line.strip().partition(" ")
            if back.strip() == file:
                found.append(name)
        return sorted(found)

    def attach(self, file: str) -> str:
        device = self._execute(["losetup", "--find", "--show", file]).stdout.strip()
        if not device.startswith("/dev/loop"):
            raise BrickError(f"losetup gave no loop device for {file}: {device!r}")
        return device

    def detach(self, device: str) -> None:
        try:
            self._execute(["losetup", "--detach", device])
        except CommandFailed as exc:
            if "No such device" not in exc.stderr:
                raise


class DmContext:
    """The few things every ``dm`` layer needs (see the module docstring)."""

    def __init__(self, settings: Settings, host: Host, *, timeout_s: float) -> None:
        self.settings = settings
        self.host = host
        self.timeout_s = timeout_s
        self.dm = DeviceMapper(
            execute=host.execute,
            devno=host.devno,
            block_device=host.block_device,
            timeout_s=timeout_s,
        )
        self.bcache = host.bcache or bcache.BcacheSysfs(host.sysfs)
        self.loops = Loops(host.execute)
        self.lock = threading.RLock()  # slots, LIO, tgt, multipath tables

    def kname(self, dm_name: str) -> str:
        """The kernel's name of a dm device (``dm-<minor>``), as sysfs knows it."""
        info = self.dm.info(dm_name)
        if info is None:
            raise NotFound("device-mapper device", dm_name)
        return f"dm-{info.minor}"

    def owned(self, kind: str) -> list[str]:
        """Images (or instances, for ``snapshot``) that have a dm device of ``kind`` of ours."""
        found = []
        for info in self.dm.list_info():
            parsed = parse(info.name, info.uuid)
            if parsed and parsed[0] == kind:
                found.append(parsed[1])
        return sorted(found)

    def is_ours(self, dm_name: str, kind: str, name: str) -> bool:
        info = self.dm.info(dm_name)
        if info is None:
            return False
        if parse(info.name, info.uuid) != (kind, name):
            LOG.warning("%s exists with uuid %r: not ours, left alone", dm_name, info.uuid)
            return False
        return True

    def remove(self, dm_name: str, kind: str, name: str) -> None:
        """Remove a dm device of ours (idempotent; a device that is not ours is left)."""
        if self.is_ours(dm_name, kind, name):
            self.dm.remove(dm_name, retry_s=5.0)
