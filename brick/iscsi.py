"""The iSCSI initiator (open-iscsi ``iscsiadm``): one ``ISCSIConnector`` for paths to images.

``connect(portal, iqn, lun, chap=None)`` logs in (once per portal and IQN) and returns the
stable ``/dev/disk/by-path/ip-<portal>-iscsi-<iqn>-lun-<lun>`` link; ``disconnect`` with the
same arguments takes it back: the SCSI disk is deleted first (``/sys/block/sdX/device/delete``),
then the session is logged out and the node record deleted, when no other LUN of that session
is still there. Both are idempotent. Every command goes through one injectable ``execute``.

Facts from a real run (open-iscsi 2.1.8, Debian 6.1 kernel, in a QEMU guest):

- Exit codes: 21 (``ISCSI_ERR_NO_OBJS_FOUND``) for "No records found", "No active sessions.",
  "No matching sessions found"; 15 (``ISCSI_ERR_SESS_EXISTS``) for a second login
  ("1 session requested, but 1 already present."); 11 when discovery cannot connect.
- ``iscsiadm -m session`` prints ``tcp: [1] 10.99.0.2:3260,1 iqn... (non-flash)`` and brackets an
  IPv6 portal (``[fd00:99::2]:3260,1``); udev's by-path link does not
  (``ip-fd00:99::2:3260-iscsi-...``).
- ``-o new`` for a portal the discovery already recorded adds a second record (tpgt -1) and the
  login then fails with "session exists", so a record is created only when ``-o show`` finds
  none. Discovery with ``-o nonpersistent`` records nothing.
- The node record shows the CHAP password as ``********``; iscsiadm takes it only as an
  argument (``-v``). So the password is handed to ``xargs -0`` on stdin, which appends it to
  the ``iscsiadm`` argv: it never appears in our argv, our logs or our errors (it is in
  iscsiadm's own argv for the few milliseconds it runs).

How fast a dead path fails is ``node.session.timeo.replacement_timeout``: SCSI commands wait that
long for the session to come back before they fail up to dm-multipath (which then uses the
other paths). The default here is 5 s instead of open-iscsi's 120 s, for multipath.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from brick import executor, values
from brick.dm import Executor
from brick.exception import BrickError, CommandFailed, InvalidArgument, Timeout
from brick.executor import Result
from brick.tgt import Chap, validate_iqn, validate_portal
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

BY_PATH_DIR = Path("/dev/disk/by-path")
SYSFS = Path("/sys")

# iscsiadm exit codes (usr/iscsi_err.h)
ERR_SESS_EXISTS = 15
ERR_NO_OBJS_FOUND = 21

_SCSI_DISK = re.compile(r"sd[a-z]{1,4}")
_SESSION = re.compile(r"(\w+): \[(\d+)\] (\S+),(-?\d+) (\S+)(?: \((non-flash|flash)\))?")
_TARGET = re.compile(r"(\S+),(-?\d+) (\S+)")

__all__ = [
    "Chap",
    "DiscoveredTarget",
    "ISCSIConnector",
    "ParseError",
    "Session",
    "by_path",
    "parse_discovery",
    "parse_node_record",
    "parse_sessions",
    "validate_lun",
]


class ParseError(BrickError):
    """``iscsiadm`` printed something this module does not understand."""

    def __init__(self, what: str, line: str, why: str) -> None:
        self.what, self.line, self.why = what, line, why
        super().__init__(f"cannot parse {what}: {why}: {line!r}")


def validate_lun(value: object) -> int:
    """A LUN 0-255 (LIO's relay exports LUN 0 or 1, tgt's image LUN 1; udev names bigger
    LUNs differently, so they are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise InvalidArgument("lun", value, "must be an integer 0-255")
    return value


def _portal_parts(portal: str) -> tuple[str, int]:
    where = values.Portal.parse(portal, names=True)
    return where.host, where.port


def by_path(portal: str, iqn: str, lun: int) -> str:
    """The udev by-path link of a LUN: ``/dev/disk/by-path/ip-<addr>:<port>-iscsi-<iqn>-lun-<n>``
    (an IPv6 address without brackets, as udev's ``path_id`` writes it)."""
    address, port = _portal_parts(validate_portal(portal))
    return f"{BY_PATH_DIR}/ip-{address}:{port}-iscsi-{validate_iqn(iqn)}-lun-{validate_lun(lun)}"


# -- parsing (pure) --------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    """One iSCSI session (``iscsiadm -m session``); ``portal`` in canonical form."""

    transport: str
    sid: int
    portal: str
    tpgt: int
    iqn: str
    flash: bool = False


@dataclass(frozen=True)
class DiscoveredTarget:
    """One ``portal,tpgt iqn`` line of a SendTargets discovery."""

    portal: str
    tpgt: int
    iqn: str


def _canonical_portal(text: str, what: str, line: str) -> str:
    try:
        return validate_portal(text)
    except InvalidArgument:
        raise ParseError(what, line, f"bad portal {text!r}") from None


def parse_sessions(text: str) -> list[Session]:
    """``iscsiadm -m session`` output (empty for "No active sessions.")."""
    sessions = []
    for line in text.splitlines():
        if not line.strip() or "No active sessions" in line:
            continue
        match = _SESSION.fullmatch(line.strip())
        if match is None:
            raise ParseError("iscsiadm -m session", line, "expected 'tcp: [sid] portal,tpgt iqn'")
        transport, sid, portal, tpgt, iqn, flash = match.groups()
        sessions.append(
            Session(
                transport,
                int(sid),
                _canonical_portal(portal, "iscsiadm -m session", line),
                int(tpgt),
                iqn,
                flash == "flash",
            )
        )
    return sessions


def parse_discovery(text: str) -> list[DiscoveredTarget]:
    """``iscsiadm -m discovery -t sendtargets`` (or ``-m node``) output."""
    found = []
    for line in text.splitlines():
        if not line.strip() or "No records found" in line:
            continue
        match = _TARGET.fullmatch(line.strip())
        if match is None:
            raise ParseError("iscsiadm discovery", line, "expected 'portal,tpgt iqn'")
        portal, tpgt, iqn = match.groups()
        found.append(
            DiscoveredTarget(_canonical_portal(portal, "iscsiadm discovery", line), int(tpgt), iqn)
        )
    return found


def parse_node_record(text: str) -> dict[str, str]:
    """``iscsiadm -m node -T iqn -p portal`` (one record): ``key = value`` lines."""
    record = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition(" = ")
        if not sep:
            raise ParseError("iscsiadm node record", line, "expected 'key = value'")
        record[key.strip()] = "" if value.strip() == "<empty>" else value.strip()
    return record


# -- the connector ---------------------------------------------------------------------------
class ISCSIConnector:
    """Paths to iSCSI LUNs on this host.

    ``execute`` runs every command (as root). ``by_path_dir`` and ``sysfs`` are where udev's
    links and the kernel's objects are read (tests point them at a temporary tree).
    ``replacement_timeout_s`` and ``noop_out_s`` (NOP-Out ping interval and timeout: how soon
    a silent dead link is noticed) are set on every node record this connector logs in with.
    """

    def __init__(
        self,
        *,
        execute: Executor = executor.execute,
        by_path_dir: Path = BY_PATH_DIR,
        sysfs: Path = SYSFS,
        replacement_timeout_s: int = 5,
        noop_out_s: int = 5,
        login_timeout_s: float = 60.0,
        device_timeout_s: float = 30.0,
    ) -> None:
        if (
            isinstance(replacement_timeout_s, bool)
            or not isinstance(replacement_timeout_s, int)
            or not 1 <= replacement_timeout_s <= 3600
        ):
            raise InvalidArgument(
                "replacement_timeout_s", replacement_timeout_s, "must be an integer 1-3600"
            )
        if (
            isinstance(noop_out_s, bool)
            or not isinstance(noop_out_s, int)
            or not 1 <= noop_out_s <= 60
        ):
            raise InvalidArgument("noop_out_s", noop_out_s, "must be an integer 1-60")
        self._execute = execute
        self.noop_out_s = noop_out_s
        self.by_path_dir = Path(by_path_dir)
        self.sysfs = Path(sysfs)
        self.replacement_timeout_s = replacement_timeout_s
        self.login_timeout_s = login_timeout_s
        self.device_timeout_s = device_timeout_s

    # -- commands ------------------------------------------------------------------------
    def _iscsiadm(
        self, *args: str, ok: Sequence[int] = (0,), timeout_s: float | None = None
    ) -> Result:
        return self._execute(
            ["iscsiadm", *args],
            check_exit_code=list(ok),
            timeout_s=timeout_s or self.login_timeout_s,
        )

    def _node(self, portal: str, iqn: str, *args: str, ok: Sequence[int] = (0,)) -> Result:
        return self._iscsiadm("-m", "node", "-T", iqn, "-p", portal, *args, ok=ok)

    def _update(self, portal: str, iqn: str, key: str, value: str) -> None:
        self._node(portal, iqn, "-o", "update", "-n", key, "-v", value)

    def _update_secret(self, portal: str, iqn: str, key: str, secret: str) -> None:
        """``-o update -n key -v <secret>`` with the secret on stdin (see module docstring)."""
        argv = ["xargs", "-0", "-r", "iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
        argv += ["-o", "update", "-n", key, "-v"]
        try:
            self._execute(argv, stdin=secret + "\0", timeout_s=self.login_timeout_s)
        except CommandFailed as exc:
            masked = exc.stderr.replace(secret, "***")
            raise CommandFailed(exc.argv, exc.exit_code, masked) from None

    def _settle(self) -> None:
        self._execute(
            ["udevadm", "settle", f"--timeout={int(self.device_timeout_s)}"],
            check_exit_code=False,
            timeout_s=self.device_timeout_s + 5,
        )

    # -- queries -------------------------------------------------------------------------
    def sessions(self) -> list[Session]:
        """Every iSCSI session of this host now."""
        out = self._iscsiadm("-m", "session", ok=(0, ERR_NO_OBJS_FOUND)).stdout
        return parse_sessions(out)

    def session(self, portal: str, iqn: str) -> Session | None:
        portal, iqn = validate_portal(portal), validate_iqn(iqn)
        return next((s for s in self.sessions() if (s.portal, s.iqn) == (portal, iqn)), None)

    def discover(self, portal: str, *, persist: bool = False) -> list[DiscoveredTarget]:
        """SendTargets discovery at ``portal``. With ``persist`` a node record is kept for
        every portal the target reports (iscsiadm's default); without, none is written."""
        portal = validate_portal(portal)
        args = ["-m", "discovery", "-t", "sendtargets", "-p", portal]
        if not persist:
            args += ["-o", "nonpersistent"]
        return parse_discovery(self._iscsiadm(*args).stdout)

    def device_path(self, portal: str, iqn: str, lun: int) -> str:
        """The by-path link ``connect`` returns (it may not exist)."""
        address, port = _portal_parts(validate_portal(portal))
        name = f"ip-{address}:{port}-iscsi-{validate_iqn(iqn)}-lun-{validate_lun(lun)}"
        return str(self.by_path_dir / name)

    def session_disks(self, sid: int) -> dict[int, str]:
        """LUN -> ``sdX`` of the SCSI disks of session ``sid`` (from sysfs)."""
        disks: dict[int, str] = {}
        base = self.sysfs / "class" / "iscsi_session" / f"session{int(sid)}" / "device"
        for block in base.glob("target*/*:*:*:*/block/*"):
            lun = block.parent.parent.name.rpartition(":")[2]
            if lun.isdigit() and _SCSI_DISK.fullmatch(block.name):
                disks[int(lun)] = block.name
        return disks

    # -- connect / disconnect ------------------------------------------------------------
    def connect(self, portal: str, iqn: str, lun: int, chap: Chap | None = None) -> str:
        """Log in to ``iqn`` at ``portal`` (if not already) and return the LUN's by-path link.

        :param portal: ``ip:port`` or ``[ipv6]:port``
        :param iqn: the target, e.g. ``iqn.2010-10.org.openstack:volume-image1``
        :param lun: 0-255
        :param chap: CHAP credentials to log in with, or None for no authentication
        :returns: ``/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-<iqn>-lun-1``
        :raises CommandFailed: the login failed (exit 24: authentication); what this call
            created (node record, session) is removed first
        :raises Timeout: the LUN did not appear within ``device_timeout_s`` (same cleanup)
        """
        portal, iqn, lun = validate_portal(portal), validate_iqn(iqn), validate_lun(lun)
        if chap is not None and not isinstance(chap, Chap):
            raise InvalidArgument("chap", type(chap).__name__, "must be a Chap")
        path = self.device_path(portal, iqn, lun)
        created_record = logged_in = False
        if self.session(portal, iqn) is None:
            created_record = self._ensure_record(portal, iqn)
            try:
                self._configure(portal, iqn, chap)
                out = self._node(portal, iqn, "--login", ok=(0, ERR_SESS_EXISTS))
                logged_in = out.exit_code == 0
            except BaseException:
                if created_record:
                    self._delete_record(portal, iqn)
                raise
            LOG.info("logged in to %s at %s%s", iqn, portal, " with CHAP" if chap else "")
        try:
            self._wait_for_device(portal, iqn, path)
        except BaseException:
            if logged_in:
                LOG.warning("%s lun %d at %s did not appear: logging out", iqn, lun, portal)
                self._logout(portal, iqn, delete_record=created_record)
            raise
        return path

    def _ensure_record(self, portal: str, iqn: str) -> bool:
        """Create the node record unless one exists; True if this call created it."""
        if self._node(portal, iqn, ok=(0, ERR_NO_OBJS_FOUND)).exit_code == 0:
            return False
        self._node(portal, iqn, "-o", "new")
        return True

    def _configure(self, portal: str, iqn: str, chap: Chap | None) -> None:
        self._update(portal, iqn, "node.startup", "manual")
        self._update(
            portal, iqn, "node.session.timeo.replacement_timeout", str(self.replacement_timeout_s)
        )
        for key in ("noop_out_interval", "noop_out_timeout"):
            self._update(portal, iqn, f"node.conn[0].timeo.{key}", str(self.noop_out_s))
        if chap is None:
            self._update(portal, iqn, "node.session.auth.authmethod", "None")
            return
        self._update(portal, iqn, "node.session.auth.authmethod", "CHAP")
        self._update(portal, iqn, "node.session.auth.username", chap.user)
        self._update_secret(portal, iqn, "node.session.auth.password", chap.password)

    def _wait_for_device(self, portal: str, iqn: str, path: str) -> None:
        self._settle()
        try:
            wait_until(
                lambda: os.path.exists(path),
                timeout_s=self.device_timeout_s / 2,
                what=f"{path} to appear",
            )
            return
        except Timeout:
            session = self.session(portal, iqn)
            if session is None:
                raise
            LOG.warning("%s has not appeared: rescanning session %d", path, session.sid)
            self._iscsiadm("-m", "session", "-r", str(session.sid), "--rescan")
        self._settle()
        wait_until(
            lambda: os.path.exists(path),
            timeout_s=self.device_timeout_s / 2,
            what=f"{path} to appear after a rescan",
        )

    def disconnect(self, portal: str, iqn: str, lun: int) -> None:
        """Undo ``connect``: delete the LUN's SCSI disk, and if the session has no other disk,
        log out and delete the node record. Idempotent: whatever is already gone is skipped."""
        portal, iqn, lun = validate_portal(portal), validate_iqn(iqn), validate_lun(lun)
        path = self.device_path(portal, iqn, lun)
        session = self.session(portal, iqn)
        disk = self._disk_of(path, session, lun)
        if disk is not None:
            self._delete_disk(disk)
            self._settle()
            wait_until(
                lambda: not os.path.lexists(path) and not (self.sysfs / "block" / disk).exists(),
                timeout_s=self.device_timeout_s,
                what=f"{disk} ({path}) to go away",
            )
            LOG.info("deleted %s (%s lun %d at %s)", disk, iqn, lun, portal)
        if session is not None:
            others = self.session_disks(session.sid)
            others.pop(lun, None)
            if others:
                LOG.info(
                    "keeping session %d to %s at %s: luns %s in use",
                    session.sid,
                    iqn,
                    portal,
                    sorted(others),
                )
                return
        self._logout(portal, iqn, delete_record=True)

    def _disk_of(self, path: str, session: Session | None, lun: int) -> str | None:
        if os.path.lexists(path):
            name = os.path.basename(os.path.realpath(path))
            if _SCSI_DISK.fullmatch(name):
                return name
        if session is not None:
            return self.session_disks(session.sid).get(lun)
        return None

    def _delete_disk(self, disk: str) -> None:
        """Flush and delete SCSI disk ``sdX`` (``echo 1 > /sys/block/sdX/device/delete``)."""
        if not _SCSI_DISK.fullmatch(disk):
            raise InvalidArgument("disk", disk, "must be a SCSI disk name sdX")
        delete = self.sysfs / "block" / disk / "device" / "delete"
        if not delete.exists():
            return
        self._execute(
            ["blockdev", "--flushbufs", f"/dev/{disk}"],
            check_exit_code=False,
            timeout_s=self.device_timeout_s,
        )
        self._execute(["tee", "-a", str(delete)], stdin="1", timeout_s=self.device_timeout_s)

    def _logout(self, portal: str, iqn: str, *, delete_record: bool) -> None:
        out = self._node(portal, iqn, "--logout", ok=(0, ERR_NO_OBJS_FOUND))
        if out.exit_code == 0:
            LOG.info("logged out of %s at %s", iqn, portal)
        if delete_record:
            self._delete_record(portal, iqn)

    def _delete_record(self, portal: str, iqn: str) -> None:
        self._node(portal, iqn, "-o", "delete", ok=(0, ERR_NO_OBJS_FOUND))
