"""Device-mapper over ``dmsetup``: tables as dataclasses, devices as one ``DeviceMapper``.

The PyPI ``pydm`` the original used is gone (the name now belongs to an unrelated project), so
this is our own small module. Two halves:

- **Tables (pure).** One frozen dataclass per target kind renders one table line:
  ``Linear``, ``Error``, ``Zero``, ``Multipath``, ``SnapshotOrigin``, ``Snapshot``, ``Cache``
  (dm-cache, smq) and ``Clone`` (dm-clone). ``Table`` joins them (contiguous from sector 0).
  ``parse_table`` / ``parse_status`` / ``parse_ls`` read what ``dmsetup`` prints back.
- **Devices.** ``DeviceMapper`` runs ``dmsetup`` through one injectable ``execute`` (the only
  seam through which root commands run; a privsep-backed executor can replace it). Every name,
  UUID and device path is validated before any command runs.

Facts from a real run (Debian 6.1 cloud kernel, dmsetup 1.02.185, in a QEMU guest) that shape
this module:

- ``dmsetup table`` prints devices as ``major:minor`` and ends some lines with a space.
- Request-based multipath ignores a path repeat count above 1: the original's ``... <dev> 128``
  is shown back as ``<dev> 1`` (the kernel logs "repeat_count > 1 is deprecated").
- A failed ``dmsetup create`` removes the half-made device itself; a failed ``dmsetup reload``
  leaves the live table untouched (and no inactive one), so ``resume`` brings the old one back.
- ``dmsetup remove`` of a missing device: ``No such device or address``; of an open one:
  ``Device or resource busy``; ``--deferred`` returns 0 and removes it at last close.

**Path failures (multipath).** The kernel moves I/O of a failed path to the other paths of the
group; a dead path therefore does not fail I/O while one path works. With *no* path left, the
original's table (no features) fails I/O at once. Here ``Multipath(queue_if_no_path=True)``
(the default) queues it instead, and ``MultipathMonitor`` bounds that queueing the way
multipathd's ``no_path_retry`` does: after ``no_path_retry_s`` seconds with no active path it
sends ``fail_if_no_path`` (queued I/O then fails), and it turns queueing back on as soon as a
path is active again. Without multipathd nobody reinstates a path the kernel failed, so the
monitor also reinstates failed paths whose SCSI device is ``running`` again. The caller (the
node's periodic loop) calls ``MultipathMonitor.check()``; brick starts no thread. How fast a dead
iSCSI path fails at all is the initiator's ``replacement_timeout`` (see ``brick.iscsi``).
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from brick import executor
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

MAPPER_DIR = "/dev/mapper"
MAX_NAME = 127  # DM_NAME_LEN 128 with the NUL
MAX_UUID = 128  # DM_UUID_LEN 129 with the NUL

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
_DEVICE_PATH = re.compile(r"/dev/[A-Za-z0-9_.:+@=,-]+(/[A-Za-z0-9_.:+@=,-]+)*")
_DEVNO = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")

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


class ParseError(BrickError):
    """``dmsetup`` printed something this module does not understand."""

    def __init__(self, what: str, text: str, why: str) -> None:
        self.what, self.text, self.why = what, text, why
        super().__init__(f"cannot parse {what}: {why}: {text!r}")


class DeviceBusy(BrickError):
    """A device-mapper device is still open and could not be removed."""

    def __init__(self, name: str, open_count: int | None = None) -> None:
        self.name, self.open_count = name, open_count
        held = f" (open count {open_count})" if open_count is not None else ""
        super().__init__(f"device-mapper device {name!r} is busy{held}")


# -- validation ------------------------------------------------------------------------------
def validate_name(value: object, field: str = "name") -> str:
    """A dm device name: 1-127 of ``[A-Za-z0-9_.:-]``, not starting with ``.`` ``:`` ``-``.

    The first character rule keeps a name from being read as a ``dmsetup`` option and from
    being ``.``/``..`` under ``/dev/mapper``.
    """
    if not isinstance(value, str) or len(value) > MAX_NAME or not _NAME.fullmatch(value):
        raise InvalidArgument(
            field, value, "must be 1-127 of A-Za-z0-9_.:- starting with a letter, digit or _"
        )
    return value


def validate_uuid(value: object, field: str = "uuid") -> str:
    """A dm UUID (our ownership tag, e.g. ``VMT-...``): 1-128 of ``[A-Za-z0-9_.:-]``."""
    if not isinstance(value, str) or len(value) > MAX_UUID or not _NAME.fullmatch(value):
        raise InvalidArgument(
            field, value, "must be 1-128 of A-Za-z0-9_.:- starting with [A-Za-z0-9_]"
        )
    return value


def validate_device(value: object, field: str = "device") -> str:
    """A device in a table: an absolute path under ``/dev/`` in normal form, or ``major:minor``.

    Only ``[A-Za-z0-9_.:+@=,-]`` and ``/`` are allowed (table fields are split on whitespace),
    so no whitespace, quotes, shell metacharacters, ``..`` or ``//``.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or len(value) > 4096:
        raise InvalidArgument(field, value, "must be a /dev/... path or major:minor")
    if _DEVNO.fullmatch(value):
        return value
    if (
        not _DEVICE_PATH.fullmatch(value)
        or os.path.normpath(value) != value
        or any(part in {".", ".."} for part in value.split("/"))
    ):
        raise InvalidArgument(
            field, value, "must be a normalised /dev/... path of A-Za-z0-9_.:+@=,- or major:minor"
        )
    return value


def _positive(value: object, field: str, *, zero: bool = False) -> int:
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(field, value, f"must be an integer >= {low}")
    return value


def _power_of_two(value: object, field: str, low: int, high: int) -> int:
    number = _positive(value, field)
    if number & (number - 1) or not low <= number <= high:
        raise InvalidArgument(field, value, f"must be a power of two {low}-{high}")
    return number


def mapper_path(name: str) -> str:
    """``/dev/mapper/<name>``."""
    return f"{MAPPER_DIR}/{validate_name(name)}"


# -- targets and tables (pure) ---------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Target:
    """One table line: ``<start> <length> <type> <args...>`` (sectors of 512 bytes)."""

    TYPE: ClassVar[str] = ""
    start: int = 0
    length: int

    def __post_init__(self) -> None:
        _positive(self.start, "start", zero=True)
        _positive(self.length, "length")
        for device in self.devices():
            validate_device(device, f"{self.TYPE} device")

    def args(self) -> list[str]:
        """The target's parameters as given to ``dmsetup``."""
        return []

    def devices(self) -> tuple[str, ...]:
        """The block devices this target opens."""
        return ()

    def line(self) -> str:
        """The table line, without a newline."""
        return " ".join([str(self.start), str(self.length), self.TYPE, *self.args()])

    def expected(self, devno: Callable[[str], str]) -> TableLine:
        """What ``dmsetup table`` prints for this target once loaded (devices as major:minor)."""
        args = [devno(a) if a in self.devices() else a for a in self.args()]
        return TableLine(self.start, self.length, self.TYPE, tuple(args))

    def matches(self, live: TableLine, devno: Callable[[str], str]) -> bool:
        """Whether the loaded line ``live`` is this target."""
        return live == self.expected(devno)


@dataclass(frozen=True, kw_only=True)
class Linear(Target):
    """``linear <device> <offset>``: ``length`` sectors of ``device`` from ``offset``."""

    TYPE: ClassVar[str] = "linear"
    device: str
    offset: int = 0

    def __post_init__(self) -> None:
        _positive(self.offset, "offset", zero=True)
        super().__post_init__()

    def args(self) -> list[str]:
        return [self.device, str(self.offset)]

    def devices(self) -> tuple[str, ...]:
        return (self.device,)


@dataclass(frozen=True, kw_only=True)
class Error(Target):
    """``error``: every I/O fails (a hole)."""

    TYPE: ClassVar[str] = "error"


@dataclass(frozen=True, kw_only=True)
class Zero(Target):
    """``zero``: reads return zeros, writes are dropped."""

    TYPE: ClassVar[str] = "zero"


MULTIPATH_SELECTORS = ("queue-length", "round-robin", "service-time")


@dataclass(frozen=True, kw_only=True)
class Multipath(Target):
    """dm-multipath with one priority group holding every path, as the original built it.

    ``Multipath(length=N, paths=(a, b))`` renders the original's line with ``queue_if_no_path``:
    ``0 N multipath 1 queue_if_no_path 0 1 1 queue-length 0 2 1 a 128 b 128``;
    ``queue_if_no_path=False`` gives it byte for byte (``0 N multipath 0 0 1 1 queue-length
    0 2 1 a 128 b 128``). ``repeat`` is the per-path repeat count (the original's 128; the
    request-based kernel target uses 1 whatever is given). ``service-time`` also takes a relative
    throughput per path (1 here). See the module docstring for how queueing is bounded.
    """

    TYPE: ClassVar[str] = "multipath"
    paths: tuple[str, ...]
    selector: str = "queue-length"
    repeat: int = 128
    queue_if_no_path: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.paths, list):
            object.__setattr__(self, "paths", tuple(self.paths))
        if not isinstance(self.paths, tuple) or not self.paths:
            raise InvalidArgument("paths", self.paths, "must be a non-empty tuple of devices")
        if len(set(self.paths)) != len(self.paths):
            raise InvalidArgument("paths", self.paths, "must not repeat a device")
        if self.selector not in MULTIPATH_SELECTORS:
            raise InvalidArgument(
                "selector", self.selector, f"must be one of {MULTIPATH_SELECTORS}"
            )
        _positive(self.repeat, "repeat")
        if not isinstance(self.queue_if_no_path, bool):
            raise InvalidArgument("queue_if_no_path", self.queue_if_no_path, "must be a bool")
        super().__post_init__()

    def _path_args(self, repeat: int) -> list[str]:
        return [str(repeat), "1"] if self.selector == "service-time" else [str(repeat)]

    def _args(self, paths: Sequence[str], repeat: int, queue: bool) -> list[str]:
        features = ["1", "queue_if_no_path"] if queue else ["0"]
        per_path = self._path_args(repeat)
        # <features> <#hw handler args>=0 <#groups>=1 <first group>=1
        # <selector> <#selector args>=0 <#paths> <#args per path> (<path> <args>)...
        head = [*features, "0", "1", "1", self.selector, "0", str(len(paths)), str(len(per_path))]
        return head + [arg for path in paths for arg in (path, *per_path)]

    def args(self) -> list[str]:
        return self._args(self.paths, self.repeat, self.queue_if_no_path)

    def devices(self) -> tuple[str, ...]:
        return self.paths

    def expected(self, devno: Callable[[str], str]) -> TableLine:
        args = self._args([devno(p) for p in self.paths], 1, self.queue_if_no_path)
        return TableLine(self.start, self.length, self.TYPE, tuple(args))

    def matches(self, live: TableLine, devno: Callable[[str], str]) -> bool:
        """Same paths in the same order and selector; the repeat count and the queueing flag
        are not compared (the kernel rewrites one, ``MultipathMonitor`` toggles the other)."""
        if (live.start, live.length, live.type) != (self.start, self.length, self.TYPE):
            return False
        try:
            parsed = parse_multipath_table(live.args)
        except ParseError:
            return False
        return parsed.selector == self.selector and parsed.paths == tuple(
            devno(p) for p in self.paths
        )


@dataclass(frozen=True, kw_only=True)
class SnapshotOrigin(Target):
    """``snapshot-origin <origin>``: the origin's own view; a write to it is first copied into
    every snapshot of ``origin``."""

    TYPE: ClassVar[str] = "snapshot-origin"
    origin: str

    def args(self) -> list[str]:
        return [self.origin]

    def devices(self) -> tuple[str, ...]:
        return (self.origin,)


@dataclass(frozen=True, kw_only=True)
class Snapshot(Target):
    """``snapshot <origin> <cow> P|N <chunk>``: a copy-on-write snapshot of ``origin``.

    ``origin`` must be the *real* device that the ``snapshot-origin`` sits on (the cached
    device), not the snapshot-origin device: the original passed ``/dev/mapper/origin_<image>``,
    so a write through the origin device would not have been copied into its snapshots. The
    original also used a non-persistent COW (``N 128``), lost with the node; the default here is
    persistent (``P``), chunk 8 sectors (4 KiB).
    """

    TYPE: ClassVar[str] = "snapshot"
    origin: str
    cow: str
    persistent: bool = True
    chunk_sectors: int = 8

    def __post_init__(self) -> None:
        if self.origin == self.cow:
            raise InvalidArgument("cow", self.cow, "must differ from the origin")
        if not isinstance(self.persistent, bool):
            raise InvalidArgument("persistent", self.persistent, "must be a bool")
        _power_of_two(self.chunk_sectors, "chunk_sectors", 8, 2097152)
        super().__post_init__()

    def args(self) -> list[str]:
        return [self.origin, self.cow, "P" if self.persistent else "N", str(self.chunk_sectors)]

    def devices(self) -> tuple[str, ...]:
        return (self.origin, self.cow)


CACHE_MODES = ("writethrough", "writeback", "passthrough")


@dataclass(frozen=True, kw_only=True)
class Cache(Target):
    """dm-cache: ``cache <metadata> <cache> <origin> <block> <#features> <features> <policy>
    <#policy args> <policy args>``.

    For cache-on-read of a read-only image: ``writethrough`` (the default; a block is never
    dirty) and the ``smq`` policy. ``block_sectors`` is a multiple of 64 (32 KiB), 64-2097152;
    512 = 256 KiB as tested. ``policy_args`` are ``(key, value)`` pairs such as
    ``("migration_threshold", "2048")``. The metadata device must start zeroed (its first 4 KiB)
    the first time.
    """

    TYPE: ClassVar[str] = "cache"
    metadata: str
    cache: str
    origin: str
    block_sectors: int = 512
    mode: str = "writethrough"
    policy: str = "smq"
    policy_args: tuple[tuple[str, str], ...] = ()
    metadata2: bool = False
    discard_passdown: bool = True

    def __post_init__(self) -> None:
        if len({self.metadata, self.cache, self.origin}) != 3:
            raise InvalidArgument("cache", self.devices(), "metadata, cache and origin must differ")
        number = _positive(self.block_sectors, "block_sectors")
        if number % 64 or not 64 <= number <= 2097152:
            raise InvalidArgument("block_sectors", number, "must be a multiple of 64, 64-2097152")
        if self.mode not in CACHE_MODES:
            raise InvalidArgument("mode", self.mode, f"must be one of {CACHE_MODES}")
        if self.policy not in ("smq", "cleaner"):
            raise InvalidArgument("policy", self.policy, "must be smq or cleaner")
        for pair in self.policy_args:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(isinstance(p, str) and re.fullmatch(r"[a-z0-9_]+", p) for p in pair)
            ):
                raise InvalidArgument("policy_args", pair, "must be (key, value) of [a-z0-9_]")
        super().__post_init__()

    def args(self) -> list[str]:
        features = [self.mode]
        if self.metadata2:
            features.append("metadata2")
        if not self.discard_passdown:
            features.append("no_discard_passdown")
        policy = [arg for pair in self.policy_args for arg in pair]
        return [
            self.metadata,
            self.cache,
            self.origin,
            str(self.block_sectors),
            str(len(features)),
            *features,
            self.policy,
            str(len(policy)),
            *policy,
        ]

    def devices(self) -> tuple[str, ...]:
        return (self.metadata, self.cache, self.origin)


@dataclass(frozen=True, kw_only=True)
class Clone(Target):
    """dm-clone: ``clone <metadata> <destination> <source> <region> [<#features> <features>
    [<#core args> <core args>]]``.

    A read of a region not yet copied goes to ``source``; regions are copied by background
    hydration (``hydration=False`` adds ``no_hydration``) or on write, not on read, so dm-clone
    is a fill-in-the-background cache rather than cache on read. Not built in Debian's kernels
    (``CONFIG_DM_CLONE`` unset): rendering only, untested against a kernel.
    """

    TYPE: ClassVar[str] = "clone"
    metadata: str
    destination: str
    source: str
    region_sectors: int = 8
    hydration: bool = True
    discard_passdown: bool = True
    hydration_threshold: int | None = None
    hydration_batch_size: int | None = None

    def __post_init__(self) -> None:
        if len({self.metadata, self.destination, self.source}) != 3:
            raise InvalidArgument(
                "clone", self.devices(), "metadata, destination, source must differ"
            )
        _power_of_two(self.region_sectors, "region_sectors", 8, 2097152)
        for name in ("hydration_threshold", "hydration_batch_size"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), name)
        super().__post_init__()

    def args(self) -> list[str]:
        args = [self.metadata, self.destination, self.source, str(self.region_sectors)]
        features = ([] if self.hydration else ["no_hydration"]) + (
            [] if self.discard_passdown else ["no_discard_passdown"]
        )
        core = []
        if self.hydration_threshold is not None:
            core += ["hydration_threshold", str(self.hydration_threshold)]
        if self.hydration_batch_size is not None:
            core += ["hydration_batch_size", str(self.hydration_batch_size)]
        if features or core:
            args += [str(len(features)), *features]
        if core:
            args += [str(len(core)), *core]
        return args

    def devices(self) -> tuple[str, ...]:
        return (self.metadata, self.destination, self.source)


@dataclass(frozen=True)
class Table:
    """A whole table: targets in order, contiguous from sector 0."""

    targets: tuple[Target, ...]

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.targets, tuple) or not self.targets:
            raise InvalidArgument("table", self.targets, "must be a non-empty tuple of targets")
        sector = 0
        for target in self.targets:
            if not isinstance(target, Target) or type(target) is Target:
                raise InvalidArgument("table", target, "must hold targets (Linear, Cache, ...)")
            if target.start != sector:
                raise InvalidArgument(
                    "table", target.line(), f"must start at sector {sector} (no gap or overlap)"
                )
            sector += target.length

    @classmethod
    def of(cls, *targets: Target) -> Table:
        return cls(tuple(targets))

    @property
    def length(self) -> int:
        """Size in 512-byte sectors."""
        return sum(t.length for t in self.targets)

    def devices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d for t in self.targets for d in t.devices()))

    def render(self) -> str:
        """The table as ``dmsetup create``/``reload`` read it (one line per target)."""
        return "".join(t.line() + "\n" for t in self.targets)

    def matches(self, live: Sequence[TableLine], devno: Callable[[str], str]) -> bool:
        return len(live) == len(self.targets) and all(
            t.matches(line, devno) for t, line in zip(self.targets, live, strict=True)
        )

    def has(self, kind: type[Target]) -> bool:
        return any(isinstance(t, kind) for t in self.targets)


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
        if not sep or not _NAME.fullmatch(name):
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
    f.number()  # next group to use
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
    return MultipathStatus(features[0] == "1", int(features[1]), tuple(groups))


@dataclass(frozen=True)
class CacheStatus:
    """``dmsetup status`` of a dm-cache target (block counts in their own block sizes)."""

    metadata_block_sectors: int
    metadata_used: int
    metadata_total: int
    block_sectors: int
    used: int
    total: int
    read_hits: int
    read_misses: int
    write_hits: int
    write_misses: int
    demotions: int
    promotions: int
    dirty: int
    features: tuple[str, ...]
    core_args: tuple[str, ...]
    policy: str
    policy_args: tuple[str, ...]
    metadata_mode: str  # rw, ro
    needs_check: bool


def _fraction(text: str, what: str) -> tuple[int, int]:
    used, sep, total = text.partition("/")
    if not sep or not used.isdigit() or not total.isdigit():
        raise ParseError(what, text, "expected used/total")
    return int(used), int(total)


def parse_cache_status(args: Sequence[str]) -> CacheStatus:
    """dm-cache status (Documentation/admin-guide/device-mapper/cache.rst)."""
    if len(args) == 1 and args[0] in ("Fail", "Error"):
        raise ParseError("cache status", args[0], "the cache has failed")
    f = _Fields(args, "cache status")
    meta_block = f.number()
    meta_used, meta_total = _fraction(f.take(), "cache status")
    block = f.number()
    used, total = _fraction(f.take(), "cache status")
    read_hits, read_misses, write_hits, write_misses = (f.number() for _ in range(4))
    demotions, promotions, dirty = (f.number() for _ in range(3))
    features, core = f.counted(), f.counted()
    policy, policy_args = f.take(), f.counted()
    mode, check = f.take(), f.take()
    f.done()
    return CacheStatus(
        metadata_block_sectors=meta_block,
        metadata_used=meta_used,
        metadata_total=meta_total,
        block_sectors=block,
        used=used,
        total=total,
        read_hits=read_hits,
        read_misses=read_misses,
        write_hits=write_hits,
        write_misses=write_misses,
        demotions=demotions,
        promotions=promotions,
        dirty=dirty,
        features=features,
        core_args=core,
        policy=policy,
        policy_args=policy_args,
        metadata_mode=mode,
        needs_check=check == "needs_check",
    )


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


TargetStatus = MultipathStatus | CacheStatus | SnapshotStatus | TableLine


def parse_status(text: str) -> list[TargetStatus]:
    """``dmsetup status NAME``: typed status for multipath, cache and snapshot targets, the
    raw ``TableLine`` for the others (linear, error, zero, snapshot-origin print nothing)."""
    parsers: dict[str, Callable[[Sequence[str]], TargetStatus]] = {
        "multipath": parse_multipath_status,
        "cache": parse_cache_status,
        "snapshot": parse_snapshot_status,
    }
    result: list[TargetStatus] = []
    for line in parse_table(text):
        parser = parsers.get(line.type)
        result.append(parser(line.args) if parser else line)
    return result


# -- the host --------------------------------------------------------------------------------
def device_number(device: str) -> str:
    """``major:minor`` of a block device (``major:minor`` itself is returned as it is)."""
    if _DEVNO.fullmatch(device):
        return device
    info = os.stat(device)
    if not stat.S_ISBLK(info.st_mode):
        raise InvalidArgument("device", device, "is not a block device")
    return f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"


def is_block_device(device: str) -> bool:
    """Whether ``device`` is ``major:minor`` or a path to an existing block device."""
    if _DEVNO.fullmatch(device):
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
        if _DEVNO.fullmatch(device):
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
        if _DEVNO.fullmatch(device):
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

    def list(self) -> builtins.list[str]:
        """The names of every device-mapper device now (``dmsetup ls``), sorted."""
        return sorted(parse_ls(self._run("ls").stdout))

    def list_info(self) -> builtins.list[DeviceInfo]:
        """Every device with its UUID and open count (to find ours by UUID prefix)."""
        argv = ("info", "-c", "--noheadings", "--separator", "|", "-o", INFO_FIELDS)
        return parse_info(self._run(*argv).stdout)


def scsi_path_ready(devno: str, sysfs: str = "/sys") -> bool:
    """Whether the SCSI disk ``major:minor`` is ``running`` again (its session is back)."""
    try:
        with open(f"{sysfs}/dev/block/{validate_device(devno)}/device/state") as f:
            return f.read().strip() == "running"
    except OSError:
        return False


@dataclass
class MultipathMonitor:
    """Bounded queueing and path reinstatement for one multipath device (see module doc).

    Call ``check()`` periodically (every few seconds). With no active path for
    ``no_path_retry_s`` it turns ``queue_if_no_path`` off so queued I/O fails instead of
    hanging forever; when a path is active again it turns queueing back on. A failed path whose
    device ``path_ready`` says is usable again is reinstated.
    """

    dm: DeviceMapper
    name: str
    no_path_retry_s: float = 30.0
    path_ready: Callable[[str], bool] = scsi_path_ready
    clock: Callable[[], float] = time.monotonic
    _no_path_since: float | None = field(default=None, init=False)
    _queue_disabled: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        validate_name(self.name)

    def check(self) -> MultipathStatus:
        """Look once, act, and return the status seen (before any action)."""
        status = self.dm.multipath_status(self.name)
        for path in status.failed_paths:
            if self.path_ready(path.device):
                LOG.info("%s: path %s is usable again: reinstating it", self.name, path.device)
                self.dm.reinstate_path(self.name, path.device)
        active = bool(status.active_paths) or any(self.path_ready(p.device) for p in status.paths)
        now = self.clock()
        if active:
            self._no_path_since = None
            if self._queue_disabled:
                LOG.info("%s: a path is back: queueing with no path again", self.name)
                self.dm.set_queue_if_no_path(self.name, True)
                self._queue_disabled = False
        else:
            if self._no_path_since is None:
                self._no_path_since = now
                LOG.warning("%s: no active path: I/O is queued", self.name)
            elif not self._queue_disabled and now - self._no_path_since >= self.no_path_retry_s:
                LOG.error(
                    "%s: no path for %.0f s: failing queued I/O",
                    self.name,
                    now - self._no_path_since,
                )
                self.dm.set_queue_if_no_path(self.name, False)
                self._queue_disabled = True
        return status
