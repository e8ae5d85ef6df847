"""A node's uplink, its readers served in strict priority (issue 15, item 4).

One device's egress: an HTB root qdisc of ours, handle ``7674:`` ("vt", :data:`MAJOR`),
holding

* ``7674:1``: the parent class, rate = ceil = the configured link rate;
* ``7674:2``: the default class (everything no filter picks), ``prio`` 0;
* ``7674:10`` + i (hex): reader slot i, ``prio`` 1 + i (HTB knows ``prio`` 0..7: slots 6 and
  on share ``prio`` 7), chosen by one u32 filter per reader address (``ip dst /32`` or
  ``ip6 dst /128``, each filter at a ``pref`` of its own, so it is added and deleted alone).

Every leaf is assured ``floor_kbit`` (rate) and may borrow up to the link (ceil); HTB lends
what is spare to the lowest ``prio`` first, so above the floors it is strict priority: while
slot 0's class is backlogged, slot 1 gets its floor and no more (``bench/prio_qdisc.py``,
docs/benchmarks.rst, "Children served in strict priority by slot"). The floor stays so
that a reader keeping its class full (a full copy, a capture) cannot starve the others.

Why the default class ranks *above* the readers: what it carries is small and must not
wait behind the node's uploads: the control plane (Volt, the bus, XML-RPC) and, above all,
this node's own reads from its parents: their requests and the TCP ACKs of what it
downloads (about 2-3 % of the download rate: more than a 1 % floor, so below the readers it
would throttle the node's own download while it uploads). A bulk sender of other traffic
on the same device would, in turn, hold the readers to their floors: not the burst case.

Only our qdisc is ever changed or removed (S-7.3): :meth:`Uplink.adopt` takes over a root
qdisc that carries our handle, :meth:`Uplink.apply` refuses (``Conflict``) a root qdisc of
someone else's (a non-zero handle that is not ours) and replaces only the kernel's default
(handle ``0:``: ``noqueue``, ``pfifo_fast``, ``fq_codel``, ``mq``), and :meth:`Uplink.remove`
deletes our root qdisc only, which gives the device its default back. Every command is an
argv list through ``brick.executor.execute`` (``tc`` is in the privsep allow-list);
addresses are checked with :mod:`ipaddress`, device names with :func:`validate_device`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from brick import values
from brick.exception import BrickError, Conflict, InvalidArgument
from brick.executor import Result, execute

LOG = logging.getLogger(__name__)

MAJOR = 0x7674  # "vt": the qdisc handle that marks the qdisc as ours
HANDLE = f"{MAJOR:x}:"
ROOT_MINOR = 0x1
DEFAULT_MINOR = 0x2
FIRST_SLOT_MINOR = 0x10
MAX_READERS = 64  # readers past these many are not filtered: they go to the default class
HTB_MAX_PRIO = 7  # HTB's prio is 0..7 (TC_HTB_NUMPRIO = 8)
FIRST_PREF = 10  # filter prefs FIRST_PREF.. are ours, one per reader
MIN_FLOOR_KBIT = 1000
MAX_MBIT = 1_000_000
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,14}", re.ASCII)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Run = Callable[..., Result]


# -- values (pure) ----------------------------------------------------------------------------
def validate_device(value: object) -> str:
    """A network device name: 1-15 of ``[A-Za-z0-9_.:-]``, starting alphanumeric."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise InvalidArgument("device", value, "must be a link name [A-Za-z0-9_.:-], <= 15 chars")
    return value


def reader_address(value: object) -> Address:
    """An IPv4 or IPv6 address (an IPv4-mapped IPv6 one as IPv4; no zone, no brackets
    needed), or ``InvalidArgument``."""
    try:
        text = values.unbracket(value) if isinstance(value, str) else value
        if not isinstance(text, str) or not text.isascii() or "%" in text:
            raise ValueError("not an address")
        address = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument("reader address", value, "must be an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def default_floor_kbit(mbit: int) -> int:
    """1 % of the link, at least :data:`MIN_FLOOR_KBIT` (1 Mbit/s)."""
    return max(MIN_FLOOR_KBIT, mbit * 10)


def slot_prio(slot: int) -> int:
    """HTB ``prio`` of reader slot ``slot``: 1 + slot, at most 7 (0 is the default class's)."""
    return min(1 + slot, HTB_MAX_PRIO)


def classid(minor: int) -> str:
    return f"{MAJOR:x}:{minor:x}"


def slot_classid(slot: int) -> str:
    return classid(FIRST_SLOT_MINOR + slot)


def ordered(readers: Iterable[object]) -> list[Address]:
    """The readers validated, duplicates dropped (the first place kept), at most
    :data:`MAX_READERS`."""
    seen: list[Address] = []
    for value in readers:
        address = reader_address(value)
        if address not in seen:
            seen.append(address)
    if len(seen) > MAX_READERS:
        LOG.warning("uplink: %d readers, only the first %d get a class", len(seen), MAX_READERS)
    return seen[:MAX_READERS]


@dataclass(frozen=True)
class Filter:
    """One reader's filter: its ``pref`` and the slot its class is."""

    pref: int
    slot: int


@dataclass(frozen=True)
class State:
    """What our qdisc holds: reader slot classes and one filter per reader address."""

    slots: frozenset[int] = frozenset()
    filters: tuple[tuple[Address, Filter], ...] = ()

    @classmethod
    def of(cls, slots: Iterable[int], filters: dict[Address, Filter]) -> State:
        return cls(frozenset(slots), tuple(sorted(filters.items(), key=lambda i: i[1].slot)))

    def filter_map(self) -> dict[Address, Filter]:
        return dict(self.filters)


def plan(state: State, readers: Sequence[Address]) -> tuple[list[list[str]], State]:
    """The tc commands that turn ``state`` into the classes and filters of ``readers`` (slot
    i for ``readers[i]``), and the new state. Each command is the argv after ``tc [-n ns]``
    without ``dev <device>`` (which :meth:`Uplink._tc` puts after its first two words).

    Order: the filters that go or move are deleted first, then missing slot classes are
    added, then the new filters, then the slot classes no reader uses any more. A reader
    whose filter is moved is in the default class (``prio`` 0) meanwhile: never starved."""
    current = state.filter_map()
    want = {address: slot for slot, address in enumerate(readers)}
    commands: list[list[str]] = []
    kept: dict[Address, Filter] = {}
    for address, old in sorted(current.items(), key=lambda item: item[1].pref):
        if want.get(address) == old.slot:
            kept[address] = old
        else:
            commands.append(["filter", "del", "parent", HANDLE, "prio", str(old.pref)])
    slots = set(state.slots)
    for slot in range(len(readers)):
        if slot not in slots:
            commands.append(_class("add", slot_classid(slot), None, slot_prio(slot)))
            slots.add(slot)
    used = {f.pref for f in kept.values()}
    for slot, address in enumerate(readers):
        if address in kept:
            continue
        pref = next(p for p in range(FIRST_PREF, FIRST_PREF + 2 * MAX_READERS + 1) if p not in used)
        used.add(pref)
        kept[address] = Filter(pref, slot)
        commands.append(_filter_add(address, pref, slot_classid(slot)))
    for slot in sorted(slots - set(range(len(readers)))):
        commands.append(["class", "del", "classid", slot_classid(slot)])
    slots &= set(range(len(readers)))
    new = State.of(slots, kept)
    return commands, new


# The rate/ceil placeholders _class leaves for Uplink to fill in.
RATE, CEIL = "{rate}", "{ceil}"


def _class(op: str, cid: str, parent: str | None, prio: int | None) -> list[str]:
    """``class <op>`` of a leaf (parent 7674:1, rate = floor, ceil = link) or of the parent
    class (``parent`` = the qdisc, rate = ceil = link); rates are filled in by Uplink."""
    if parent is None:
        argv = ["class", op, "parent", classid(ROOT_MINOR), "classid", cid, "htb"]
        argv += ["rate", RATE, "ceil", CEIL]
    else:
        argv = ["class", op, "parent", parent, "classid", cid, "htb", "rate", CEIL, "ceil", CEIL]
    if prio is not None:
        argv += ["prio", str(prio)]
    return argv


def _filter_add(address: Address, pref: int, flowid: str) -> list[str]:
    if address.version == 4:
        proto, match = ["protocol", "ip"], ["match", "ip", "dst", f"{address}/32"]
    else:
        proto, match = ["protocol", "ipv6"], ["match", "ip6", "dst", f"{address}/128"]
    return ["filter", "add", "parent", HANDLE, *proto, "prio", str(pref), "u32", *match,
            "flowid", flowid]  # fmt: skip


# -- parsing tc's output (pure) ---------------------------------------------------------------
_ROOT_QDISC = re.compile(r"^qdisc (\S+) ([0-9a-f]+): root\b", re.MULTILINE)
_FILTER_HEAD = re.compile(
    r"^filter (?:parent \S+ )?protocol (ip|ipv6) pref (\d+) u32 .*?\bfh ([0-9a-f]+)::([0-9a-f]+)"
    r" .*?\bflowid ([0-9a-f]+:[0-9a-f]+)"
)
_MATCH = re.compile(r"^\s+match ([0-9a-f]{8})/([0-9a-f]{8}) at (\d+)")
_CLASS = re.compile(r"^class htb ([0-9a-f]+):([0-9a-f]+) ", re.MULTILINE)
_V4_DST, _V6_DST = 16, (24, 28, 32, 36)


def root_qdisc(text: str) -> tuple[str, int] | None:
    """(kind, major) of the root qdisc in ``tc qdisc show dev X`` output, or None."""
    match = _ROOT_QDISC.search(text)
    return None if match is None else (match.group(1), int(match.group(2), 16))


def parse_classes(text: str) -> set[int]:
    """The minors of our HTB classes in ``tc class show dev X``."""
    return {int(m, 16) for major, m in _CLASS.findall(text) if int(major, 16) == MAJOR}


@dataclass(frozen=True)
class ShownFilter:
    """One u32 filter as ``tc filter show`` prints it: its pref, the class it picks and the
    destination address it matches (None if it matches anything else)."""

    pref: int
    flowid: str
    address: Address | None


def parse_filters(text: str) -> list[ShownFilter]:
    """The u32 filter nodes (``fh <ht>::<n>``) of ``tc filter show dev X parent 7674:``,
    with their ``match`` lines read back into an address when they are exactly one
    ``ip dst /32`` or ``ip6 dst /128``."""
    found: list[ShownFilter] = []
    head: tuple[str, int, str] | None = None
    matches: list[tuple[str, str, int]] = []

    def close() -> None:
        if head is not None:
            found.append(ShownFilter(head[1], head[2], _address(head[0], matches)))

    for line in text.splitlines():
        if line.startswith("filter "):
            close()
            head, matches = None, []
            m = _FILTER_HEAD.match(line)
            if m is not None:
                head = (m.group(1), int(m.group(2)), m.group(5))
        elif head is not None and (m2 := _MATCH.match(line)):
            matches.append((m2.group(1), m2.group(2), int(m2.group(3))))
    close()
    return found


def _address(proto: str, matches: list[tuple[str, str, int]]) -> Address | None:
    by_offset = {at: value for value, mask, at in matches if mask == "ffffffff"}
    if len(by_offset) != len(matches):
        return None
    if proto == "ip" and set(by_offset) == {_V4_DST}:
        return ipaddress.IPv4Address(int(by_offset[_V4_DST], 16))
    if proto == "ipv6" and set(by_offset) == set(_V6_DST):
        return ipaddress.IPv6Address(int("".join(by_offset[at] for at in _V6_DST), 16))
    return None


# -- the device -------------------------------------------------------------------------------
def device_of(address: str, *, run: Run = execute) -> str:
    """The device that carries ``address`` (``ip -o addr show``); ``BrickError`` if none."""
    wanted = reader_address(address)
    for line in run(["ip", "-o", "addr", "show"]).stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in ("inet", "inet6"):
            try:
                here = ipaddress.ip_interface(fields[3]).ip
            except ValueError:
                continue
            if here == wanted:
                return validate_device(fields[1].split("@")[0])
    raise BrickError(f"no device carries {address} (ip -o addr show)")


def link_speed_mbit(device: str, sys_class_net: Path = Path("/sys/class/net")) -> int | None:
    """The link's speed in Mbit/s from sysfs, or None when the kernel does not know it (a
    virtual link, a link that is down: ``-1`` or unreadable)."""
    try:
        text = (sys_class_net / validate_device(device) / "speed").read_text().strip()
    except OSError:
        return None
    return int(text) if values.is_ascii_decimal(text) and int(text) > 0 else None


class Uplink:
    """One device's egress with one strict-priority class per reader; see the module text.

    ``netns``: the device lives in this network namespace (``tc -n``; tests and labs),
    else in ours. ``run``: the command runner (``brick.executor.execute``; tests record)."""

    def __init__(
        self,
        device: str,
        mbit: int,
        floor_kbit: int | None = None,
        *,
        netns: str | None = None,
        run: Run = execute,
    ) -> None:
        self.device = validate_device(device)
        if isinstance(mbit, bool) or not isinstance(mbit, int) or not 1 <= mbit <= MAX_MBIT:
            raise InvalidArgument("link rate (Mbit/s)", mbit, f"must be an integer 1-{MAX_MBIT}")
        floor = default_floor_kbit(mbit) if floor_kbit is None else floor_kbit
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 1:
            raise InvalidArgument("floor (kbit/s)", floor, "must be an integer >= 1")
        if floor * 10 > mbit * 1000:
            raise InvalidArgument("floor (kbit/s)", floor, "must be at most a tenth of the link")
        self.mbit, self.floor_kbit = mbit, floor
        self.netns = None if netns is None else values.netns(netns)
        self.run = run
        self.state: State | None = None  # None: our qdisc is not there (as far as we know)
        self.readers: list[Address] = []

    # -- commands --------------------------------------------------------------------------
    def _tc(self, argv: Sequence[str], **kw: object) -> Result:
        """``tc [-n ns] <argv[0..1]> dev <device> <argv[2:]>``, rates filled in."""
        rates = {RATE: f"{self.floor_kbit}kbit", CEIL: f"{self.mbit}mbit"}
        filled = [rates.get(a, a) for a in argv]
        prefix = ["tc"] if self.netns is None else ["tc", "-n", self.netns]
        return self.run([*prefix, *filled[:2], "dev", self.device, *filled[2:]], **kw)

    def _show(self, what: str, *extra: str) -> str:
        return self._tc([what, "show", *extra]).stdout

    # -- queries ---------------------------------------------------------------------------
    def root(self) -> tuple[str, int] | None:
        """(kind, major) of the device's root qdisc now."""
        return root_qdisc(self._show("qdisc"))

    def is_ours(self) -> bool:
        return self.root() == ("htb", MAJOR)

    def adopt(self) -> bool:
        """Take over our qdisc if the device's root carries our handle (a previous run's):
        read its slot classes and filters back, and bring every class to this object's
        rates (``class replace``). False (nothing changed) if the root is not ours."""
        if not self.is_ours():
            self.state = None
            return False
        minors = parse_classes(self._show("class"))
        for argv in self._base("replace"):
            self._tc(argv)
        slots = {m - FIRST_SLOT_MINOR for m in minors if m >= FIRST_SLOT_MINOR}
        for slot in sorted(slots):
            self._tc(_class("replace", slot_classid(slot), None, slot_prio(slot)))
        filters: dict[Address, Filter] = {}
        stray: set[int] = set()
        for shown in parse_filters(self._show("filter", "parent", HANDLE)):
            slot = int(shown.flowid.partition(":")[2], 16) - FIRST_SLOT_MINOR
            good = shown.address is not None and slot in slots and shown.pref >= FIRST_PREF
            if good and shown.address not in filters:
                assert shown.address is not None
                filters[shown.address] = Filter(shown.pref, slot)
            else:
                stray.add(shown.pref)
        for pref in sorted(stray - {f.pref for f in filters.values()}):
            self._tc(["filter", "del", "parent", HANDLE, "prio", str(pref)])
        self.state = State.of(slots, filters)
        self.readers = [a for a, _ in self.state.filters]
        LOG.info("uplink %s: adopted our qdisc (%d reader classes)", self.device, len(slots))
        return True

    def _base(self, op: str) -> list[list[str]]:
        """The qdisc (op ``add`` only), the parent class and the default class (``replace``
        creates a class that is missing)."""
        argv = []
        if op == "add":
            argv.append(["qdisc", "add", "root", "handle", HANDLE, "htb", "default",
                         f"{DEFAULT_MINOR:x}"])  # fmt: skip
        argv.append(_class(op, classid(ROOT_MINOR), HANDLE, None))
        argv.append(_class(op, classid(DEFAULT_MINOR), None, 0))
        return argv

    # -- changes ---------------------------------------------------------------------------
    def apply(self, readers: Iterable[object]) -> int:
        """Make the classes and filters those of ``readers`` (slot i for the i-th, in this
        order); returns how many tc commands it ran (0 when nothing changed: no command at
        all, not even a ``show``). Creates our qdisc when the root is the kernel's default;
        ``Conflict`` if the root is someone else's qdisc."""
        wanted = ordered(readers)
        ran = 0
        if self.state is None:
            root = self.root()
            if root == ("htb", MAJOR):
                self.adopt()
            elif root is not None and root[1] != 0:
                raise Conflict(
                    "root qdisc", f"{root[0]} {root[1]:x}: on {self.device}",
                    "is not ours (handle 7674:): left alone",
                )  # fmt: skip
            else:
                for argv in self._base("add"):
                    self._tc(argv)
                    ran += 1
                self.state = State()
                LOG.info(
                    "uplink %s: htb %s at %d Mbit/s, floor %d kbit/s",
                    self.device, HANDLE, self.mbit, self.floor_kbit,
                )  # fmt: skip
        assert self.state is not None
        if wanted == self.readers and ran == 0:
            return 0
        commands, new = plan(self.state, wanted)
        try:
            for argv in commands:
                self._tc(argv)
                ran += 1
        except BaseException:
            # what the kernel holds now is between the two states: the next apply adopts
            # it again (reads it back) before it plans
            self.state, self.readers = None, []
            raise
        self.state, self.readers = new, wanted
        if commands:
            LOG.info("uplink %s: readers by priority %s", self.device, [str(a) for a in wanted])
        return ran

    def remove(self) -> bool:
        """Delete our root qdisc (the device gets its default back); True if there was one.
        Someone else's qdisc is never touched."""
        ours = self.is_ours()
        if ours:
            self._tc(["qdisc", "del", "root", "handle", HANDLE], check_exit_code=(0, 2))
            LOG.info("uplink %s: removed our qdisc", self.device)
        self.state, self.readers = None, []
        return ours
