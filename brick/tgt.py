"""The userspace iSCSI target tgt: one ``tgtd`` process and its ``tgtadm`` control socket.

Used by the image server (export image files) and by every compute node (relay its cached
image read-only). Two classes:

- ``TgtDaemon``: start, adopt and stop one ``tgtd`` (its own control port ``-C N``, its own
  portals, optionally inside a network namespace).
- ``TgtAdm``: targets, LUNs, ACLs and CHAP accounts of one running ``tgtd``. Nothing is cached:
  every query reads ``tgtadm --op show`` again, so a restarted process sees what is there.

Facts about tgt 1.0.85 that shape this module (see shared/reference/env-userspace-stack.md D):

- tgtd ignores SIGTERM and SIGINT; it stops only through ``tgtadm --op delete --mode system``,
  which is refused (``tgtadm: invalid request``) while any target exists. SIGKILL is the
  fallback, by PID only.
- The control socket ``/var/run/tgtd/socket.N`` (+ ``.lock``) is a file, shared by every
  network namespace, and stays behind after tgtd exits.
- A portal that cannot be bound (address in use) does not stop tgtd: it logs
  ``failed to create/bind to portal`` and runs without it. ``portal=::1:3260`` (IPv6 without
  brackets) is silently ignored and tgtd listens on 0.0.0.0:3260 instead. ``start`` therefore
  checks the daemon's own listening sockets.
- ``--params readonly=1`` is rejected by ``--op new``; it is applied with ``--op update``.
- ``Size:`` in ``--op show`` is in decimal megabytes, rounded (4 MiB shows as ``4 MB``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import signal
import stat
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from brick import proc, values
from brick.exception import (
    BrickError,
    CommandFailed,
    Conflict,
    InvalidArgument,
    NotFound,
    Timeout,
)
from brick.executor import SECRET_FLAGS, Result, execute
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/tgtd")
NETNS_DIR = Path("/var/run/netns")
ALL_INITIATORS = "ALL"

# tgtadm's exit codes: 22 (EINVAL) for every refused request, 107 (ENOTCONN) when no tgtd
# listens on the control socket.
_NOT_CONNECTED = 107
_TARGET_GONE = "can't find the target"
_ACCOUNT_GONE = "can't find the account"
_ALREADY_EXISTS = "already exists"

_CHAP_USER = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CHAP_PASSWORD = re.compile(r"[!-~]{12,64}")  # printable ASCII, no space


# -- validation ------------------------------------------------------------------------------
def validate_iqn(value: object, field: str = "iqn") -> str:
    """An iSCSI qualified name ``iqn.YYYY-MM.reverse.domain[:suffix]`` of at most 223 chars."""
    return values.iqn(value, field)


def validate_backing_path(value: object, field: str = "backing_path") -> str:
    """An absolute path to an existing regular file or block device; returned normalised."""
    if not isinstance(value, str | os.PathLike):
        raise InvalidArgument(field, value, "must be a path")
    text = os.fspath(value)
    if not isinstance(text, str) or not os.path.isabs(text):
        raise InvalidArgument(field, value, "must be an absolute path")
    if any(ord(c) < 32 or c == "\x7f" for c in text) or text != text.strip():
        raise InvalidArgument(field, value, "must not contain control characters or edge spaces")
    text = os.path.normpath(text)
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        raise InvalidArgument(field, value, "does not exist") from None
    except OSError as exc:
        raise InvalidArgument(field, value, f"cannot be examined: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise InvalidArgument(field, value, "must be a regular file or a block device")
    return text


def validate_port(value: object, field: str, low: int = 1, high: int = 65535) -> int:
    return values.port(value, field, low, high)


def validate_control_port(value: object) -> int:
    """tgtd's ``-C`` control port: it names the socket file, so 0-65535."""
    return validate_port(value, "control_port", 0, 65535)


def validate_lun(value: object) -> int:
    """A data LUN 1-255 (LUN 0 is tgtd's own controller)."""
    return validate_port(value, "lun", 1, 255)


def validate_portal(value: object, field: str = "portal") -> str:
    """``ipv4:port`` or ``[ipv6]:port`` (an IP literal: tgtd resolves nothing); canonical form."""
    if not isinstance(value, str) or ":" not in value:
        raise InvalidArgument(field, value, "must be ip:port or [ipv6]:port")
    head, _, port_text = value.rpartition(":")
    bracketed = head.startswith("[") and head.endswith("]")
    try:
        address = ipaddress.ip_address(head[1:-1] if bracketed else head)
    except ValueError:
        raise InvalidArgument(field, value, "must be ip:port or [ipv6]:port") from None
    if bracketed != (address.version == 6):
        raise InvalidArgument(field, value, "an IPv6 address needs brackets: [ipv6]:port")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidArgument(field, value, "port must be 1-65535")
    return values.join_host_port(str(address), int(port_text))


def validate_initiator(value: object, field: str = "initiators") -> str:
    """``ALL``, an IP address or a network (``127.0.0.0/8``); canonical form."""
    if value == ALL_INITIATORS:
        return ALL_INITIATORS
    if isinstance(value, str):
        try:
            if "/" in value:
                return str(ipaddress.ip_network(value, strict=True))
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    raise InvalidArgument(field, value, "must be ALL, an IP address or an IP network")


validate_netns = values.netns


# -- the objects tgtd reports ----------------------------------------------------------------
@dataclass(frozen=True)
class Chap:
    """A CHAP (incoming) account. The password never appears in reprs or logs."""

    user: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.user, str) or not _CHAP_USER.fullmatch(self.user):
            raise InvalidArgument("chap.user", self.user, "must be 1-64 of A-Za-z0-9._:-")
        if not isinstance(self.password, str) or not _CHAP_PASSWORD.fullmatch(self.password):
            raise InvalidArgument(
                "chap.password", "***", "must be 12-64 printable characters without spaces"
            )

    def __repr__(self) -> str:
        return f"Chap(user={self.user!r}, password='***')"


@dataclass(frozen=True)
class Lun:
    """A data LUN. ``size_mb`` is what tgtd shows: decimal megabytes (10**6 B), rounded."""

    number: int
    backing_path: str
    size_mb: int
    readonly: bool


@dataclass(frozen=True)
class Connection:
    """One iSCSI connection: the initiator's IQN and its IP address, in I_T nexus ``nexus``."""

    initiator: str
    address: str
    nexus: int = 0


@dataclass(frozen=True)
class Target:
    """A target as ``tgtadm --op show --mode target`` reports it.

    ``luns`` holds the data LUNs only (tgtd's LUN 0 controller is left out); ``accounts`` the
    incoming CHAP users bound to it; ``acl`` the allowed initiator addresses (or ``ALL``).
    """

    tid: int
    iqn: str
    luns: tuple[Lun, ...] = ()
    connections: tuple[Connection, ...] = ()
    accounts: tuple[str, ...] = ()
    acl: tuple[str, ...] = ()
    outgoing_accounts: tuple[str, ...] = ()

    def lun(self, number: int) -> Lun | None:
        return next((lun for lun in self.luns if lun.number == number), None)


class ParseError(BrickError):
    """``tgtadm`` printed something this module does not understand."""

    def __init__(self, line_no: int, line: str, why: str) -> None:
        self.line_no, self.line, self.why = line_no, line, why
        super().__init__(f"tgtadm output line {line_no}: {why}: {line!r}")


# -- parsing (pure) --------------------------------------------------------------------------
_TARGET_HEAD = re.compile(r"Target (\d+): (\S+)")
_SECTIONS = {
    "System information:": "system",
    "I_T nexus information:": "nexus",
    "LUN information:": "lun",
    "Account information:": "account",
    "ACL information:": "acl",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _key_value(line: str) -> tuple[str, str]:
    key, sep, value = line.strip().partition(":")
    return (key, value.strip()) if sep else ("", line.strip())


def _lun_from(fields: dict[str, str], line_no: int) -> Lun | None:
    """A data LUN from its ``key: value`` lines, or None for the LUN 0 controller."""
    try:
        number = int(fields["LUN"])
        if fields.get("Type") == "controller" or fields.get("Backing store type") == "null":
            return None
        size = re.fullmatch(r"(\d+) MB", fields["Size"].partition(",")[0].strip())
        if size is None:
            raise ParseError(line_no, fields["Size"], "unexpected LUN size")
        return Lun(
            number=number,
            backing_path=fields["Backing store path"],
            size_mb=int(size.group(1)),
            readonly=fields["Readonly"] == "Yes",
        )
    except (KeyError, ValueError) as exc:
        raise ParseError(line_no, repr(fields), f"incomplete LUN ({exc})") from None


@dataclass
class _Building:
    tid: int
    iqn: str
    luns: list[Lun] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    acl: list[str] = field(default_factory=list)
    outgoing: list[str] = field(default_factory=list)
    section: str = ""
    lun_fields: dict[str, str] | None = None
    lun_line: int = 0
    nexus: int | None = None
    initiator: str = ""

    def close_lun(self) -> None:
        if self.lun_fields is not None:
            lun = _lun_from(self.lun_fields, self.lun_line)
            if lun is not None:
                self.luns.append(lun)
        self.lun_fields = None

    def done(self) -> Target:
        self.close_lun()
        return Target(
            tid=self.tid,
            iqn=self.iqn,
            luns=tuple(self.luns),
            connections=tuple(self.connections),
            accounts=tuple(self.accounts),
            acl=tuple(self.acl),
            outgoing_accounts=tuple(self.outgoing),
        )

    def add(self, line_no: int, line: str) -> None:
        """One indented line of this target's block."""
        depth, stripped = _indent(line), line.strip()
        if depth == 4:
            if stripped not in _SECTIONS:
                raise ParseError(line_no, line, "unknown section")
            self.close_lun()
            self.section, self.nexus = _SECTIONS[stripped], None
            return
        key, value = _key_value(line)
        if self.section == "lun":
            if depth == 8 and key == "LUN":
                self.close_lun()
                self.lun_fields, self.lun_line = {}, line_no
            if self.lun_fields is None:
                raise ParseError(line_no, line, "LUN detail outside a LUN")
            self.lun_fields[key] = value
        elif self.section == "nexus":
            if depth == 8 and key == "I_T nexus" and value.isdigit():
                self.nexus, self.initiator = int(value), ""
            elif self.nexus is None:
                raise ParseError(line_no, line, "connection detail outside an I_T nexus")
            elif key == "Initiator":
                self.initiator = value.partition(" alias:")[0].strip()
            elif key == "IP Address":
                self.connections.append(Connection(self.initiator, value, self.nexus))
        elif self.section == "account" and depth == 8:
            if stripped.endswith(" (outgoing)"):
                self.outgoing.append(stripped.removesuffix(" (outgoing)"))
            else:
                self.accounts.append(stripped)
        elif self.section == "acl" and depth == 8:
            self.acl.append(stripped)
        elif self.section != "system":
            raise ParseError(line_no, line, "line outside any known section")


def parse_targets(text: str) -> list[Target]:
    """Parse ``tgtadm --lld iscsi --op show --mode target`` (tgt 1.0.85) into targets.

    Raises ``ParseError`` on a line it cannot place (unknown keys inside a LUN are kept
    quiet: only the ones read here matter).
    """
    targets: list[Target] = []
    current: _Building | None = None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if _indent(line) == 0:
            head = _TARGET_HEAD.fullmatch(line.strip())
            if head is None:
                raise ParseError(line_no, line, "expected 'Target N: iqn'")
            if current is not None:
                targets.append(current.done())
            current = _Building(int(head.group(1)), head.group(2))
        elif current is None:
            raise ParseError(line_no, line, "text before the first target")
        else:
            current.add(line_no, line)
    if current is not None:
        targets.append(current.done())
    return targets


def parse_accounts(text: str) -> list[str]:
    """Parse ``tgtadm --lld iscsi --op show --mode account`` into user names."""
    users = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.strip() == "Account list:":
            continue
        if _indent(line) != 4:
            raise ParseError(line_no, line, "expected an indented account name")
        users.append(line.strip())
    return users


# -- tgtadm ----------------------------------------------------------------------------------
_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(control_port: int) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(control_port, threading.Lock())


def _masked(argv: Sequence[str]) -> list[str]:
    return ["***" if i and argv[i - 1] in SECRET_FLAGS else arg for i, arg in enumerate(argv)]


def _same_file(a: str, b: str) -> bool:
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class TgtAdm:
    """The targets of the tgtd listening on control port ``control_port`` (``tgtadm -C N``).

    Changes made through one ``TgtAdm`` are serialised per control port within the process;
    across processes ``create_target`` retries when another creator takes its tid.
    """

    def __init__(self, control_port: int, *, timeout_s: float = 30.0) -> None:
        self.control_port = validate_control_port(control_port)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"TgtAdm(control_port={self.control_port})"

    def _argv(self, *args: str) -> list[str]:
        return ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args]

    def _run(self, *args: str) -> Result:
        try:
            return execute(self._argv(*args), timeout_s=self.timeout_s)
        except CommandFailed as exc:
            exc.argv = _masked(exc.argv)  # the error may be logged: no CHAP password in it
            if exc.exit_code == _NOT_CONNECTED:
                exc.add_note(f"no tgtd answers on control port {self.control_port}")
            raise

    def answers(self, *, timeout_s: float = 5.0) -> bool:
        """Whether a tgtd answers on this control port (``Timeout`` if one hangs)."""
        argv = self._argv("--op", "show", "--mode", "target")
        return execute(argv, check_exit_code=False, timeout_s=timeout_s).exit_code == 0

    # -- queries -------------------------------------------------------------------------
    def targets(self) -> list[Target]:
        """Every target of this tgtd, read now."""
        return parse_targets(self._run("--op", "show", "--mode", "target").stdout)

    def find(self, iqn: str) -> Target | None:
        iqn = validate_iqn(iqn)
        return next((t for t in self.targets() if t.iqn == iqn), None)

    def connections(self, iqn: str) -> list[Connection]:
        """The initiators connected to ``iqn`` now ([] if there is no such target)."""
        target = self.find(iqn)
        return list(target.connections) if target else []

    def accounts(self) -> list[str]:
        """The CHAP accounts of this tgtd (they are per daemon, bound to targets by name)."""
        return parse_accounts(self._run("--op", "show", "--mode", "account").stdout)

    # -- changes -------------------------------------------------------------------------
    def create_target(
        self,
        iqn: str,
        backing_path: str | os.PathLike[str],
        *,
        lun: int = 1,
        readonly: bool = True,
        initiators: Sequence[str] = (ALL_INITIATORS,),
        chap: Chap | None = None,
    ) -> int:
        """Export ``backing_path`` as LUN ``lun`` of target ``iqn``; return its tid.

        Idempotent: if ``iqn`` is already exported exactly so, its tid is returned. If it
        exists but differs (backing, readonly, ACL, CHAP user), raise ``Conflict``. The
        initiator ACL is bound last, so nobody can log in before the target is complete. On
        any failure, whatever this call created is removed before the error is raised.

        A CHAP account is per tgtd: an existing account with ``chap.user`` that another target
        uses is shared as it is (tgtd cannot show its password), so give every target of one
        daemon the same password per user.
        """
        iqn = validate_iqn(iqn)
        path = validate_backing_path(backing_path)
        lun = validate_lun(lun)
        if not isinstance(readonly, bool):
            raise InvalidArgument("readonly", readonly, "must be a bool")
        if isinstance(initiators, str) or not initiators:
            raise InvalidArgument("initiators", initiators, "must be a non-empty list")
        acl = tuple(dict.fromkeys(validate_initiator(i) for i in initiators))
        if ALL_INITIATORS in acl and len(acl) > 1:
            raise InvalidArgument("initiators", initiators, "ALL excludes other entries")
        if chap is not None and not isinstance(chap, Chap):
            raise InvalidArgument("chap", type(chap).__name__, "must be a Chap")

        with _lock_for(self.control_port):
            for _attempt in range(5):
                current = self.targets()
                existing = next((t for t in current if t.iqn == iqn), None)
                if existing is not None:
                    self._check_same(existing, path, lun, readonly, acl, chap)
                    return existing.tid
                used = {t.tid for t in current}
                tid = next(n for n in range(1, len(used) + 2) if n not in used)
                try:
                    self._run("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
                except CommandFailed as exc:
                    if _ALREADY_EXISTS in exc.stderr:  # another process took the tid or iqn
                        continue
                    raise
                break
            else:
                raise Conflict("target", iqn, "could not get a free tid after 5 attempts")
            try:
                self._fill(tid, path, lun, readonly, acl, chap, current)
                made = next((t for t in self.targets() if t.tid == tid), None)
                if made is None:
                    raise NotFound("target", iqn)
                self._check_same(made, path, lun, readonly, acl, chap)
            except BaseException as exc:
                self._undo(tid, chap, exc)
                raise
        LOG.info(
            "exported %s as %s lun %d (tid %d, %s, acl %s, chap %s)",
            path,
            iqn,
            lun,
            tid,
            "read-only" if readonly else "read-write",
            ",".join(acl),
            chap.user if chap else "none",
        )
        return tid

    def _fill(
        self,
        tid: int,
        path: str,
        lun: int,
        readonly: bool,
        acl: tuple[str, ...],
        chap: Chap | None,
        before: list[Target],
    ) -> None:
        """Complete target ``tid``: CHAP, LUN, readonly, then the ACL that opens it."""
        t, n = str(tid), str(lun)
        if chap is not None:
            in_use = any(
                chap.user in (*x.accounts, *x.outgoing_accounts) for x in before if x.tid != tid
            )
            if not in_use:
                if chap.user in self.accounts():
                    # a stray account (left by a crash): recreate it so our password applies
                    self._run("--op", "delete", "--mode", "account", "--user", chap.user)
                self._run(
                    "--op", "new", "--mode", "account", "--user", chap.user,
                    "--password", chap.password,
                )  # fmt: skip
            self._run("--op", "bind", "--mode", "account", "--tid", t, "--user", chap.user)
        self._run("--op", "new", "--mode", "logicalunit", "--tid", t, "--lun", n, "-b", path)
        if readonly:  # refused on "--op new"; applied before any initiator may log in
            self._run(
                "--op", "update", "--mode", "logicalunit", "--tid", t, "--lun", n,
                "--params", "readonly=1",
            )  # fmt: skip
        for address in acl:
            self._run("--op", "bind", "--mode", "target", "--tid", t, "-I", address)

    def _undo(self, tid: int, chap: Chap | None, exc: BaseException) -> None:
        """Remove target ``tid`` and (if nothing else uses it) the account; notes on ``exc``."""
        try:
            self._delete_tid(tid)
            if chap is not None:
                self._delete_unused_account(chap.user)
        except BrickError as undo_exc:
            exc.add_note(f"undo of target tid {tid} failed too: {undo_exc}")
            LOG.error("could not undo the half-made target tid %d: %s", tid, undo_exc)

    @staticmethod
    def _check_same(
        target: Target,
        path: str,
        lun: int,
        readonly: bool,
        acl: tuple[str, ...],
        chap: Chap | None,
    ) -> None:
        have = target.lun(lun)
        if have is None:
            raise Conflict("target", target.iqn, f"has no LUN {lun} (tid {target.tid})")
        if not _same_file(have.backing_path, path):
            raise Conflict("target", target.iqn, f"LUN {lun} exports {have.backing_path!r}")
        if have.readonly != readonly:
            raise Conflict("target", target.iqn, f"LUN {lun} readonly is {have.readonly}")
        if set(target.acl) != set(acl):
            raise Conflict("target", target.iqn, f"initiator ACL is {list(target.acl)}")
        want = [chap.user] if chap else []
        if sorted(target.accounts) != want:
            raise Conflict("target", target.iqn, f"CHAP accounts are {list(target.accounts)}")

    def delete_target(self, iqn: str) -> None:
        """Remove target ``iqn`` even with initiators connected; "already gone" is success.

        Its CHAP accounts are deleted too unless another target still uses them.
        """
        iqn = validate_iqn(iqn)
        with _lock_for(self.control_port):
            target = self.find(iqn)
            if target is None:
                return
            self._delete_tid(target.tid)
            for user in (*target.accounts, *target.outgoing_accounts):
                self._delete_unused_account(user)
        LOG.info(
            "removed target %s (tid %d, %d connection(s) dropped)",
            iqn,
            target.tid,
            len(target.connections),
        )

    def _delete_tid(self, tid: int) -> None:
        try:
            self._run("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")
        except CommandFailed as exc:
            if _TARGET_GONE not in exc.stderr:
                raise

    def _delete_unused_account(self, user: str) -> None:
        targets = self.targets()
        if any(user in (*t.accounts, *t.outgoing_accounts) for t in targets):
            return
        try:
            self._run("--op", "delete", "--mode", "account", "--user", user)
        except CommandFailed as exc:
            if _ACCOUNT_GONE not in exc.stderr:
                raise


# -- tgtd ------------------------------------------------------------------------------------
def _listening(pid: int) -> set[str]:
    """``ip:port`` (``[v6]:port``) of the TCP sockets that process ``pid`` listens on."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    found = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, _, hex_port = cols[1].partition(":")
            if len(hex_ip) != width:
                continue
            raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, width, 8))
            address = ipaddress.ip_address(raw)
            found.add(values.join_host_port(str(address), int(hex_port, 16)))
    return found


class TgtDaemon:
    """One ``tgtd -f -C N --iscsi portal=...`` process, started in the background.

    Files: ``run_dir/tgtd-N.log`` (its output), ``run_dir/tgtd-N.pid``, and tgtd's own
    ``/var/run/tgtd/socket.N`` + ``.lock``. With ``netns``, tgtd is started through
    ``nsenter --net=/var/run/netns/<netns>``, so only its network namespace differs.
    """

    def __init__(
        self,
        control_port: int,
        portals: Iterable[str],
        *,
        run_dir: Path,
        netns: str | None = None,
    ) -> None:
        self.control_port = validate_control_port(control_port)
        if isinstance(portals, str):
            raise InvalidArgument("portals", portals, "must be a list of ip:port")
        self.portals = [validate_portal(p, "portals") for p in portals]
        if not self.portals:
            raise InvalidArgument("portals", portals, "needs at least one ip:port")
        self.run_dir = Path(run_dir)
        self.netns = None if netns is None else validate_netns(netns)
        self.pid: int | None = None
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self.adm = TgtAdm(self.control_port)

    def __repr__(self) -> str:
        return f"TgtDaemon(control_port={self.control_port}, portals={self.portals})"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"tgtd-{self.control_port}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"tgtd-{self.control_port}.log"

    @property
    def socket_files(self) -> tuple[Path, Path]:
        sock = SOCKET_DIR / f"socket.{self.control_port}"
        return sock, sock.with_name(sock.name + ".lock")

    def _portal_arg(self) -> str:
        # "portal=a,b" silently drops b: every portal needs its own "portal=".
        return ",".join(f"portal={p}" for p in self.portals)

    def argv(self) -> list[str]:
        base = ["tgtd", "-f", "-C", str(self.control_port), "--iscsi", self._portal_arg()]
        if self.netns is None:
            return base
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", *base]

    # -- which process is ours -----------------------------------------------------------
    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live tgtd with our ``-C N`` (guards against PID reuse)."""
        if self._proc is not None and self._proc.pid == pid:
            self._proc.poll()  # reap it if it has exited
        if proc.is_gone(pid):
            return False
        argv = proc.cmdline(pid)
        if not argv or os.path.basename(argv[0]) != "tgtd":
            return False
        return any(
            argv[i] == "-C" and argv[i + 1] == str(self.control_port) for i in range(len(argv) - 1)
        )

    def _pid_from_file(self) -> int | None:
        try:
            text = self.pidfile.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def _known_pid(self) -> int | None:
        for pid in (self.pid, self._pid_from_file()):
            if pid is not None and self._is_ours(pid):
                return pid
        return None

    def _netns_inode(self) -> tuple[int, int]:
        path = NETNS_DIR / self.netns if self.netns else Path("/proc/self/ns/net")
        info = os.stat(path)
        return info.st_dev, info.st_ino

    def running(self) -> bool:
        """Whether our tgtd process is alive and answers on its control port."""
        return self.alive() and self.adm.answers()

    def alive(self) -> bool:
        """Whether our tgtd process exists (no call on the control port: cheap enough to
        poll every second)."""
        return self._known_pid() is not None

    def adopt(self, *, timeout_s: float = 5.0) -> bool:
        """Take over a tgtd left running (by an earlier process) from the pidfile.

        Returns False if there is none (a stale pidfile is removed). Raises ``Conflict`` if
        it runs with other portals or in another network namespace than asked for.
        """
        pid = self._pid_from_file()
        if pid is None or not self._is_ours(pid):
            if pid is not None:
                LOG.info("removing stale pidfile %s (pid %d is gone)", self.pidfile, pid)
                self.pidfile.unlink(missing_ok=True)
            return False
        argv = proc.cmdline(pid)
        if self._portal_arg() not in argv:
            raise Conflict("tgtd", f"pid {pid}", f"runs as {argv}, not with {self.portals}")
        try:
            theirs = os.stat(f"/proc/{pid}/ns/net")
            if (theirs.st_dev, theirs.st_ino) != self._netns_inode():
                raise Conflict("tgtd", f"pid {pid}", f"not in network namespace {self.netns}")
        except FileNotFoundError:
            return False
        wait_until(
            self.adm.answers,
            timeout_s=timeout_s,
            what=f"tgtd pid {pid} to answer on control port {self.control_port}",
        )
        self.pid = pid
        LOG.info("adopted tgtd pid %d (control port %d)", pid, self.control_port)
        return True

    # -- start / stop --------------------------------------------------------------------
    def start(self, *, timeout_s: float = 10.0) -> None:
        """Start tgtd and wait until it answers and listens on every portal.

        Idempotent if our tgtd already runs. Raises ``Conflict`` if another tgtd answers on
        the control port or a portal cannot be bound, ``CommandFailed`` if tgtd exits.
        """
        if self.netns is not None and not (NETNS_DIR / self.netns).exists():
            raise NotFound("network namespace", self.netns)
        if self.adopt():
            return
        if self.adm.answers():
            raise Conflict(
                "tgtd control port", str(self.control_port), "another tgtd answers on it"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        with open(self.logfile, "ab") as log:
            self._log_offset = log.tell()
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives us; a restarted owner adopts it
                    close_fds=True,
                )
            except FileNotFoundError as exc:
                raise CommandFailed(argv, 127, f"{exc.filename}: not found") from None
        self.pid = self._proc.pid
        tmp = self.pidfile.with_suffix(".pid.tmp")
        tmp.write_text(f"{self.pid}\n")
        os.replace(tmp, self.pidfile)
        LOG.debug("started %s as pid %d", argv, self.pid)

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise CommandFailed(argv, self._proc.returncode, self._log_tail())
            return self.adm.answers()

        def listening() -> bool:
            return set(self.portals) <= _listening(self.pid or 0)

        try:
            wait_until(ready, timeout_s=timeout_s, what=f"tgtd -C {self.control_port} to answer")
            # tgtd binds its portals before it serves the control socket; this normally
            # holds at once and fails only when a portal could not be bound.
            wait_until(listening, timeout_s=0.5, what=f"tgtd to listen on {self.portals}")
        except Timeout as exc:
            missing = set(self.portals) - _listening(self.pid or 0)
            self._stop_failed_start()
            if missing:
                raise Conflict(
                    "portal",
                    ",".join(sorted(missing)),
                    f"tgtd could not bind it: {self._log_tail('portal')}",
                ) from exc
            raise
        except BaseException:
            self._stop_failed_start()
            raise
        LOG.info(
            "tgtd pid %d serves %s (control port %d%s)",
            self.pid,
            ",".join(self.portals),
            self.control_port,
            f", netns {self.netns}" if self.netns else "",
        )

    def _stop_failed_start(self) -> None:
        """Stop the tgtd this start launched, and only it: if it has already exited (say,
        another tgtd holds the control port's lock), nothing else is touched."""
        if self._known_pid() is None:
            if self._proc is not None:
                self._proc.poll()
            self._proc, self.pid = None, None
            self.pidfile.unlink(missing_ok=True)
            return
        try:
            self.stop(timeout_s=5.0)
        except BrickError as exc:
            LOG.error("could not stop the tgtd that failed to start: %s", exc)

    def _log_tail(self, containing: str = "") -> str:
        """The last lines tgtd logged since this start (those with ``containing``)."""
        try:
            with open(self.logfile, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "no log"
        lines = [line for line in text.strip().splitlines() if containing in line]
        return " | ".join(lines[-4:]) or "nothing logged"

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Delete every target, ask tgtd to exit, wait for it; SIGKILL by PID only after
        ``timeout_s``. Removes the pidfile and the control socket files. Idempotent."""
        pid = self._known_pid()
        try:
            answering = self.adm.answers(timeout_s=min(5.0, timeout_s))
        except Timeout:  # hung: only SIGKILL (by PID) can end it
            LOG.warning("tgtd -C %d does not answer", self.control_port)
            answering = False
        if answering:
            for target in self.adm.targets():
                self.adm._delete_tid(target.tid)
            try:
                self.adm._run("--op", "delete", "--mode", "system")
            except CommandFailed as exc:
                LOG.warning("tgtd -C %d refused to exit: %s", self.control_port, exc)
        if pid is not None:
            try:
                wait_until(
                    lambda: proc.ended(pid, self._is_ours),
                    timeout_s=timeout_s,
                    what=f"tgtd pid {pid} to exit",
                )
            except Timeout:
                LOG.warning("tgtd pid %d did not exit in %g s: SIGKILL", pid, timeout_s)
                if self._is_ours(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                wait_until(
                    lambda: proc.ended(pid, self._is_ours),
                    timeout_s=timeout_s,
                    what=f"tgtd pid {pid} to die after SIGKILL",
                )
        elif answering:
            wait_until(
                lambda: not self.adm.answers(),
                timeout_s=timeout_s,
                what=f"tgtd -C {self.control_port} to exit",
            )
        if self._proc is not None:
            self._proc.poll()
            self._proc = None
        for path in self.socket_files:
            path.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        if pid is not None:
            LOG.info("stopped tgtd pid %d (control port %d)", pid, self.control_port)
        self.pid = None
