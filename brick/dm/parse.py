"""Parsers (pure) of what ``dmsetup`` prints: ``table``, ``ls``, ``info -c`` and ``status``
(typed for multipath and snapshot targets)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from brick.exception import BrickError

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")  # a dm device name (brick.dm.table)


class ParseError(BrickError):
    """``dmsetup`` printed something this module does not understand."""

    def __init__(self, what: str, text: str, why: str) -> None:
        self.what, self.text, self.why = what, text, why
        super().__init__(f"cannot parse {what}: {why}: {text!r}")


# -- parsing (pure) --------------------------------------------------------------------------
@dataclass(frozen=True)
class TableLine:
    """One line of ``dmsetup table`` or ``dmsetup status``, split into fields."""

    start: int
    length: int
    type: str
    args: tuple[str, ...] = ()


def _line(text: str, what: str) -> TableLine:
    fields = text.split()
    if len(fields) < 3 or not fields[0].isdigit() or not fields[1].isdigit():
        raise ParseError(what, text, "expected '<start> <length> <type> ...'")
    return TableLine(int(fields[0]), int(fields[1]), fields[2], tuple(fields[3:]))


def parse_table(text: str) -> list[TableLine]:
    """``dmsetup table NAME`` (or ``status NAME``): one ``TableLine`` per target."""
    return [_line(line, "dmsetup table") for line in text.splitlines() if line.strip()]


def parse_table_all(text: str) -> dict[str, list[TableLine]]:
    """``dmsetup table`` / ``status`` without a name: ``name: <line>`` for every device."""
    devices: dict[str, list[TableLine]] = {}
    if text.strip() == "No devices found":
        return devices
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, rest = line.partition(": ")
        if not sep or not NAME.fullmatch(name):
            raise ParseError("dmsetup table", line, "expected 'name: <table line>'")
        devices.setdefault(name, []).append(_line(rest, "dmsetup table"))
    return devices


_LS_LINE = re.compile(r"(\S+)\s+\((\d+)(?::|, )(\d+)\)")


def parse_ls(text: str) -> dict[str, tuple[int, int]]:
    """``dmsetup ls``: ``name<TAB>(major:minor)`` lines, or ``No devices found``."""
    devices: dict[str, tuple[int, int]] = {}
    if text.strip() == "No devices found":
        return devices
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _LS_LINE.fullmatch(line.strip())
        if match is None:
            raise ParseError("dmsetup ls", line, "expected 'name (major:minor)'")
        devices[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    return devices


@dataclass(frozen=True)
class DeviceInfo:
    """One device as ``dmsetup info -c`` reports it."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    live: bool
    inactive: bool
    suspended: bool
    readonly: bool
    targets: int

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"


INFO_FIELDS = "name,uuid,major,minor,open,attr,segments"


def parse_info(text: str) -> list[DeviceInfo]:
    """``dmsetup info -c --noheadings --separator '|' -o <INFO_FIELDS>``, one device a line."""
    devices = []
    for line in text.splitlines():
        if not line.strip() or line.strip() == "No devices found":
            continue
        fields = line.split("|")
        if len(fields) != 7 or not all(f.isdigit() for f in (*fields[2:5], fields[6])):
            raise ParseError("dmsetup info", line, f"expected {INFO_FIELDS} separated by '|'")
        name, uuid, major, minor, count, attr, segments = fields
        if len(attr) < 4:
            raise ParseError("dmsetup info", line, "attr must have 4 flags like L--w")
        devices.append(
            DeviceInfo(
                name=name,
                uuid=uuid,
                major=int(major),
                minor=int(minor),
                open_count=int(count),
                live=attr[0] == "L",
                inactive=attr[1] == "I",
                suspended=attr[2] == "s",
                readonly=attr[3] == "r",
                targets=int(segments),
            )
        )
    return devices


class _Fields:
    """A cursor over whitespace-split fields, with counted groups."""

    def __init__(self, fields: Sequence[str], what: str) -> None:
        self.fields, self.pos, self.what = list(fields), 0, what

    def take(self) -> str:
        if self.pos >= len(self.fields):
            raise ParseError(self.what, " ".join(self.fields), "ends too early")
        self.pos += 1
        return self.fields[self.pos - 1]

    def number(self) -> int:
        text = self.take()
        if not text.isdigit():
            raise ParseError(self.what, " ".join(self.fields), f"expected a number, got {text!r}")
        return int(text)

    def counted(self) -> tuple[str, ...]:
        return tuple(self.take() for _ in range(self.number()))

    def done(self) -> None:
        if self.pos != len(self.fields):
            raise ParseError(self.what, " ".join(self.fields), "has trailing fields")


@dataclass(frozen=True)
class MultipathTable:
    """The parameters of a loaded one-group multipath table."""

    features: tuple[str, ...]
    selector: str
    paths: tuple[str, ...]

    @property
    def queue_if_no_path(self) -> bool:
        return "queue_if_no_path" in self.features


def parse_multipath_table(args: Sequence[str]) -> MultipathTable:
    """The args of a ``multipath`` table line (any number of groups; paths of all groups)."""
    f = _Fields(args, "multipath table")
    features = f.counted()
    f.counted()  # hardware handler
    groups = f.number()
    f.number()  # initial group
    selectors, paths = [], []
    for _ in range(groups):
        selectors.append(f.take())
        f.counted()  # selector args
        count, per_path = f.number(), f.number()
        for _ in range(count):
            paths.append(f.take())
            for _ in range(per_path):
                f.take()
    f.done()
    selector = selectors[0] if len(set(selectors)) == 1 else ",".join(selectors)
    return MultipathTable(features, selector, tuple(paths))


@dataclass(frozen=True)
class PathStatus:
    """One path of a multipath device: ``major:minor``, active or failed, failures so far."""

    device: str
    active: bool
    fail_count: int


@dataclass(frozen=True)
class PathGroupStatus:
    state: str  # A active, E enabled, D disabled
    paths: tuple[PathStatus, ...]


@dataclass(frozen=True)
class MultipathStatus:
    """``dmsetup status`` of a multipath target."""

    queueing_io: bool  # no usable path and I/O is being queued now
    pg_init_count: int
    groups: tuple[PathGroupStatus, ...]
    next_group: int = 0  # 1-based: the group in use, or chosen at the next I/O; 0 none yet

    @property
    def paths(self) -> tuple[PathStatus, ...]:
        return tuple(p for g in self.groups for p in g.paths)

    @property
    def active_paths(self) -> tuple[PathStatus, ...]:
        return tuple(p for p in self.paths if p.active)

    @property
    def failed_paths(self) -> tuple[PathStatus, ...]:
        return tuple(p for p in self.paths if not p.active)


def parse_multipath_status(args: Sequence[str]) -> MultipathStatus:
    """``2 <queue_io> <pg_init_count> <#hw> <hw...> <#groups> <next group>`` then per group
    ``<A|E|D> <#group args> <group args> <#paths> <#selector args>`` and per path
    ``<major:minor> <A|F> <fail count> <selector args>`` (dm-mpath, kernel 6.1)."""
    f = _Fields(args, "multipath status")
    features = f.counted()
    if len(features) != 2 or not all(x.isdigit() for x in features):
        raise ParseError("multipath status", " ".join(args), "expected '2 <queue_io> <pg_init>'")
    f.counted()  # hardware handler status
    group_count = f.number()
    next_group = f.number()
    groups = []
    for _ in range(group_count):
        state = f.take()
        if state not in ("A", "E", "D"):
            raise ParseError("multipath status", " ".join(args), f"bad group state {state!r}")
        f.counted()  # group status args
        path_count, selector_args = f.number(), f.number()
        paths = []
        for _ in range(path_count):
            device, path_state, fails = f.take(), f.take(), f.number()
            if path_state not in ("A", "F"):
                raise ParseError(
                    "multipath status", " ".join(args), f"bad path state {path_state!r}"
                )
            for _ in range(selector_args):
                f.take()
            paths.append(PathStatus(device, path_state == "A", fails))
        groups.append(PathGroupStatus(state, tuple(paths)))
    f.done()
    return MultipathStatus(features[0] == "1", int(features[1]), tuple(groups), next_group)


def _fraction(text: str, what: str) -> tuple[int, int]:
    used, sep, total = text.partition("/")
    if not sep or not used.isdigit() or not total.isdigit():
        raise ParseError(what, text, "expected used/total")
    return int(used), int(total)


@dataclass(frozen=True)
class SnapshotStatus:
    """``dmsetup status`` of a snapshot: COW sectors used of ``total``; ``state`` is ``ok`` or
    the kernel's word for a dead snapshot (``Invalid``, ``Overflow``, ``Merge failed``)."""

    state: str
    allocated: int = 0
    total: int = 0
    metadata: int = 0

    @property
    def valid(self) -> bool:
        return self.state == "ok"


def parse_snapshot_status(args: Sequence[str]) -> SnapshotStatus:
    text = " ".join(args)
    if text in ("Invalid", "Overflow", "Merge failed", "Unknown"):
        return SnapshotStatus(text)
    if len(args) != 2 or not args[1].isdigit():
        raise ParseError("snapshot status", text, "expected '<allocated>/<total> <metadata>'")
    allocated, total = _fraction(args[0], "snapshot status")
    return SnapshotStatus("ok", allocated, total, int(args[1]))


TargetStatus = MultipathStatus | SnapshotStatus | TableLine


def parse_status(text: str) -> list[TargetStatus]:
    """``dmsetup status NAME``: typed status for multipath, cache and snapshot targets, the
    raw ``TableLine`` for the others (linear, error, zero, snapshot-origin print nothing)."""
    parsers: dict[str, Callable[[Sequence[str]], TargetStatus]] = {
        "multipath": parse_multipath_status,
        "snapshot": parse_snapshot_status,
    }
    result: list[TargetStatus] = []
    for line in parse_table(text):
        parser = parsers.get(line.type)
        result.append(parser(line.args) if parser else line)
    return result
