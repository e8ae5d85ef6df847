"""tgt's values and what ``tgtadm --op show`` prints: validation of every name, portal and path
that reaches tgtd, the objects it reports (``Target``, ``Lun``, ``Connection``, ``Chap``) and
the parsers ``parse_targets`` / ``parse_accounts`` (pure)."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field

from brick import values
from brick.exception import (
    BrickError,
    InvalidArgument,
)

ALL_INITIATORS = "ALL"
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
    try:
        head, port_text = values.Portal.split(value)
        address = values.ip(head)
    except ValueError as err:
        rule = str(err) if "brackets" in str(err) else "must be ip:port or [ipv6]:port"
        raise InvalidArgument(field, value, rule) from None
    try:
        return values.join_host_port(address, values.parse_port(port_text))
    except ValueError:
        raise InvalidArgument(field, value, "port must be 1-65535") from None


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
