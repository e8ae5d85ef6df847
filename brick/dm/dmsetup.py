"""``DeviceMapper``: device-mapper devices through ``dmsetup`` and ``blockdev``.

It runs every command through one injectable ``execute`` (the only seam through which root
commands run; a privsep-backed executor can replace it). Every name, UUID and device path is
validated before any command runs.
"""

from __future__ import annotations

import builtins
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import Protocol

from brick import executor
from brick.dm.parse import (
    INFO_FIELDS,
    DeviceInfo,
    MultipathStatus,
    ParseError,
    TableLine,
    TargetStatus,
    parse_info,
    parse_ls,
    parse_status,
    parse_table,
)
from brick.dm.table import (
    DEVNO,
    MAPPER_DIR,
    Multipath,
    Table,
    validate_device,
    validate_name,
    validate_uuid,
)
from brick.exception import (
    BrickError,
    CommandFailed,
    Conflict,
    InvalidArgument,
    NotFound,
    Timeout,
)
from brick.executor import Result
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

# dmsetup's messages (stderr) for the cases this module handles.
_NO_DEVICE = ("No such device or address", "Device does not exist")
_BUSY = "Device or resource busy"


class Executor(Protocol):
    """What ``brick.executor.execute`` looks like; tests pass a fake."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check_exit_code: bool | Sequence[int] = True,
        timeout_s: float = 60.0,
        stdin: str | None = None,
    ) -> Result: ...


class DeviceBusy(BrickError):
    """A device-mapper device is still open and could not be removed."""

    def __init__(self, name: str, open_count: int | None = None) -> None:
        self.name, self.open_count = name, open_count
        held = f" (open count {open_count})" if open_count is not None else ""
        super().__init__(f"device-mapper device {name!r} is busy{held}")


# -- the host --------------------------------------------------------------------------------
def device_number(device: str) -> str:
    """``major:minor`` of a block device (``major:minor`` itself is returned as it is)."""
    if DEVNO.fullmatch(device):
        return device
    info = os.stat(device)
    if not stat.S_ISBLK(info.st_mode):
        raise InvalidArgument("device", device, "is not a block device")
    return f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"


def is_block_device(device: str) -> bool:
    """Whether ``device`` is ``major:minor`` or a path to an existing block device."""
    if DEVNO.fullmatch(device):
        return True
    try:
        return stat.S_ISBLK(os.stat(device).st_mode)
    except OSError:
        return False


def _is_missing(exc: CommandFailed) -> bool:
    return any(text in exc.stderr for text in _NO_DEVICE)


class DeviceMapper:
    """Device-mapper devices through ``dmsetup``; nothing is cached, every call asks the kernel.

    ``execute`` runs every command (as root); ``devno`` and ``block_device`` look at device
    nodes (tests pass fakes). ``timeout_s`` bounds each command and the wait for the
    ``/dev/mapper`` node.
    """

    def __init__(
        self,
        *,
        execute: Executor = executor.execute,
        devno: Callable[[str], str] = device_number,
        block_device: Callable[[str], bool] = is_block_device,
        timeout_s: float = 30.0,
    ) -> None:
        self._execute = execute
        self._devno = devno
        self._block_device = block_device
        self.timeout_s = timeout_s

    def _run(self, *args: str, stdin: str | None = None) -> Result:
        try:
            return self._execute(["dmsetup", *args], timeout_s=self.timeout_s, stdin=stdin)
        except CommandFailed as exc:
            # dmsetup ends every error with "Command failed."; the reason is the line before
            lines = [x for x in exc.stderr.strip().splitlines() if x.strip() != "Command failed."]
            if not lines or lines == exc.stderr.strip().splitlines():
                raise
            raise CommandFailed(exc.argv, exc.exit_code, "\n".join(lines) + "\n") from None

    def _check_devices(self, table: Table) -> None:
        if not isinstance(table, Table):
            raise InvalidArgument("table", type(table).__name__, "must be a Table")
        for device in table.devices():
            if not self._block_device(device):
                raise NotFound("block device", device)

    # -- queries -------------------------------------------------------------------------
    def info(self, name: str) -> DeviceInfo | None:
        """The device ``name`` now, or None if there is none."""
        name = validate_name(name)
        argv = ("info", "-c", "--noheadings", "--separator", "|", "-o", INFO_FIELDS, name)
        try:
            devices = parse_info(self._run(*argv).stdout)
        except CommandFailed as exc:
            if _is_missing(exc):
                return None
            raise
        return next((d for d in devices if d.name == name), None)

    def exists(self, name: str) -> bool:
        return self.info(name) is not None

    def table(self, name: str) -> list[TableLine]:
        """The live table of ``name`` (devices as ``major:minor``); ``NotFound`` if none."""
        name = validate_name(name)
        try:
            return parse_table(self._run("table", name).stdout)
        except CommandFailed as exc:
            if _is_missing(exc):
                raise NotFound("device-mapper device", name) from None
            raise

    def status(self, name: str) -> list[TargetStatus]:
        """The status of every target of ``name``; ``NotFound`` if there is no such device."""
        name = validate_name(name)
        try:
            return parse_status(self._run("status", name).stdout)
        except CommandFailed as exc:
            if _is_missing(exc):
                raise NotFound("device-mapper device", name) from None
            raise

    def multipath_status(self, name: str) -> MultipathStatus:
        found = [s for s in self.status(name) if isinstance(s, MultipathStatus)]
        if len(found) != 1:
            raise NotFound("multipath target of", name)
        return found[0]

    def size(self, device: str) -> int:
        """Size of a block device in 512-byte sectors (``blockdev --getsz``)."""
        device = validate_device(device)
        if DEVNO.fullmatch(device):
            raise InvalidArgument("device", device, "blockdev needs a path, not major:minor")
        out = self._execute(["blockdev", "--getsz", device], timeout_s=self.timeout_s).stdout
        text = out.strip()
        if not text.isdigit() or int(text) == 0:
            raise ParseError("blockdev --getsz", out, "expected a positive sector count")
        return int(text)

    def read_only(self, device: str) -> bool:
        """Whether a block device is read-only (``blockdev --getro``): an iSCSI disk of a
        read-only LUN is, and a multipath table over it must then be created ``readonly``."""
        device = validate_device(device)
        if DEVNO.fullmatch(device):
            raise InvalidArgument("device", device, "blockdev needs a path, not major:minor")
        out = self._execute(["blockdev", "--getro", device], timeout_s=self.timeout_s).stdout
        if out.strip() not in ("0", "1"):
            raise ParseError("blockdev --getro", out, "expected 0 or 1")
        return out.strip() == "1"

    # -- changes -------------------------------------------------------------------------
    def create(
        self, name: str, table: Table, *, uuid: str | None = None, readonly: bool = False
    ) -> str:
        """Create ``name`` with ``table``; return ``/dev/mapper/<name>``.

        Idempotent: if ``name`` exists with this table (UUID, read-only mode), it is adopted.
        If it exists but differs, raise ``Conflict``. ``NotFound`` if a device of the table is
        missing. The table goes to ``dmsetup`` on stdin (no temporary file; any number of lines).

        ``readonly`` loads the table read-only. A multipath table over read-only paths (the
        disks of a read-only LUN) needs it: read-write, the kernel refuses the paths with
        ``-EROFS``. dm-cache, snapshot-origin and snapshot tables above may stay read-write.
        """
        name = validate_name(name)
        if uuid is not None:
            uuid = validate_uuid(uuid)
        if not isinstance(readonly, bool):
            raise InvalidArgument("readonly", readonly, "must be a bool")
        self._check_devices(table)
        path = f"{MAPPER_DIR}/{name}"
        if self._adopt(name, table, uuid, readonly):
            return path
        argv = ["create", name]
        if uuid is not None:
            argv += ["--uuid", uuid]
        if readonly:
            argv.append("--readonly")
        try:
            self._run(*argv, stdin=table.render())
        except CommandFailed as exc:
            if _BUSY in exc.stderr and self._adopt(name, table, uuid, readonly):  # made meanwhile
                return path
            exc.add_note(f"table: {table.render().strip()!r}")
            raise
        wait_until(
            lambda: self._block_device(path),
            timeout_s=self.timeout_s,
            what=f"{path} to appear",
        )
        LOG.info("created %s: %s", name, "; ".join(t.line() for t in table.targets))
        return path

    def _adopt(self, name: str, table: Table, uuid: str | None, readonly: bool) -> bool:
        info = self.info(name)
        if info is None:
            return False
        live = self.table(name)
        if uuid is not None and info.uuid != uuid:
            raise Conflict("device-mapper device", name, f"uuid {info.uuid!r}, not {uuid!r}")
        if info.readonly != readonly:
            mode = "read-only" if info.readonly else "read-write"
            raise Conflict("device-mapper device", name, f"it is {mode}")
        if not table.matches(live, self._devno):
            shown = "; ".join(f"{x.start} {x.length} {x.type} {' '.join(x.args)}" for x in live)
            raise Conflict("device-mapper device", name, f"live table is {shown!r}")
        if info.suspended:
            self.resume(name)
        LOG.info("adopted %s (same table)", name)
        return True

    def reload(self, name: str, table: Table, *, noflush: bool | None = None) -> None:
        """Replace the table of ``name``: suspend, load, resume (resumed even if the load fails,
        which leaves the old table live; the load's error is raised then).

        ``noflush`` (default: when either table is multipath) suspends without flushing
        queued I/O, so a multipath device with no working path can still be switched to new
        paths instead of hanging in suspend. A stale inactive table is cleared first. The new
        table keeps the device's mode (``--readonly`` for a read-only device).
        """
        name = validate_name(name)
        self._check_devices(table)
        info = self.info(name)
        if info is None:
            raise NotFound("device-mapper device", name)
        if noflush is None:
            noflush = table.has(Multipath) or any(x.type == "multipath" for x in self.table(name))
        if info.inactive:
            LOG.warning("%s had an inactive table left behind: clearing it", name)
            self._run("clear", name)
        self._run("suspend", *(["--noflush"] if noflush else []), name)
        try:
            self._run(
                "reload", *(["--readonly"] if info.readonly else []), name, stdin=table.render()
            )
        except CommandFailed as exc:
            exc.add_note(f"{name} keeps its old table (resumed)")
            raise
        finally:
            self.resume(name)
        LOG.info("reloaded %s: %s", name, "; ".join(t.line() for t in table.targets))

    def resume(self, name: str) -> None:
        """Resume ``name`` (after a suspend, or one a crashed process left suspended)."""
        self._run("resume", validate_name(name))

    def remove(self, name: str, *, retry_s: float = 2.0, deferred: bool = False) -> bool:
        """Remove ``name``; True if it is gone, False if removal was deferred.

        Idempotent: a missing device counts as removed. A busy (open) device is retried for
        ``retry_s`` (udev and blkid open new devices for a moment); then, with ``deferred``,
        the kernel removes it at its last close (``--deferred``), otherwise ``DeviceBusy``.
        """
        name = validate_name(name)
        if not isinstance(deferred, bool):
            raise InvalidArgument("deferred", deferred, "must be a bool")
        busy: list[CommandFailed] = []

        def attempt() -> bool:
            try:
                self._run("remove", name)
            except CommandFailed as exc:
                if _is_missing(exc):
                    return True
                if _BUSY not in exc.stderr:
                    raise
                busy.append(exc)
                return False
            return True

        try:
            wait_until(attempt, timeout_s=retry_s, what=f"{name} to be closed")
        except Timeout:
            info = self.info(name)
            if info is None:
                return True
            if deferred:
                self._run("remove", "--deferred", name)
                LOG.info("removal of %s deferred (open count %d)", name, info.open_count)
                return False
            raise DeviceBusy(name, info.open_count) from busy[-1]
        LOG.info("removed %s", name)
        return True

    # -- multipath messages --------------------------------------------------------------
    def _message(self, name: str, *words: str) -> None:
        self._run("message", validate_name(name), "0", *words)

    def set_queue_if_no_path(self, name: str, enabled: bool) -> None:
        """Turn queueing with no path on or off (off fails the I/O queued so far)."""
        if not isinstance(enabled, bool):
            raise InvalidArgument("enabled", enabled, "must be a bool")
        self._message(name, "queue_if_no_path" if enabled else "fail_if_no_path")

    def fail_path(self, name: str, device: str) -> None:
        self._message(name, "fail_path", validate_device(device))

    def reinstate_path(self, name: str, device: str) -> None:
        self._message(name, "reinstate_path", validate_device(device))

    def switch_group(self, name: str, group: int) -> None:
        """Make priority group ``group`` (1-based) the one the next I/O uses."""
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise InvalidArgument("group", group, "must be an integer >= 1")
        self._message(name, "switch_group", str(group))

    def list(self) -> builtins.list[str]:
        """The names of every device-mapper device now (``dmsetup ls``), sorted."""
        return sorted(parse_ls(self._run("ls").stdout))

    def list_info(self) -> builtins.list[DeviceInfo]:
        """Every device with its UUID and open count (to find ours by UUID prefix)."""
        argv = ("info", "-c", "--noheadings", "--separator", "|", "-o", INFO_FIELDS)
        return parse_info(self._run(*argv).stdout)
