"""Device-mapper tables (pure): one frozen dataclass per target kind renders one table line.

``Linear``, ``Error``, ``Zero``, ``Multipath``, ``SnapshotOrigin`` and ``Snapshot``; ``Table``
joins them (contiguous from sector 0). Every name, UUID and device path is validated here.
Facts about the kernel that shape the tables are in :mod:`brick.dm`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from brick.dm.parse import NAME, ParseError, TableLine, parse_multipath_table
from brick.exception import InvalidArgument

MAPPER_DIR = "/dev/mapper"
MAX_NAME = 127  # DM_NAME_LEN 128 with the NUL
MAX_UUID = 128  # DM_UUID_LEN 129 with the NUL

_DEVICE_PATH = re.compile(r"/dev/[A-Za-z0-9_.:+@=,-]+(/[A-Za-z0-9_.:+@=,-]+)*")
DEVNO = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")


# -- validation ------------------------------------------------------------------------------
def validate_name(value: object, field: str = "name") -> str:
    """A dm device name: 1-127 of ``[A-Za-z0-9_.:-]``, not starting with ``.`` ``:`` ``-``.

    The first character rule keeps a name from being read as a ``dmsetup`` option and from
    being ``.``/``..`` under ``/dev/mapper``.
    """
    if not isinstance(value, str) or len(value) > MAX_NAME or not NAME.fullmatch(value):
        raise InvalidArgument(
            field, value, "must be 1-127 of A-Za-z0-9_.:- starting with a letter, digit or _"
        )
    return value


def validate_uuid(value: object, field: str = "uuid") -> str:
    """A dm UUID (our ownership tag, e.g. ``VMT-...``): 1-128 of ``[A-Za-z0-9_.:-]``."""
    if not isinstance(value, str) or len(value) > MAX_UUID or not NAME.fullmatch(value):
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
    if DEVNO.fullmatch(value):
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
                raise InvalidArgument("table", target, "must hold targets (Linear, Multipath, ...)")
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
