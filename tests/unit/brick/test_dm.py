"""brick.dm without a kernel: table rendering (the original's exact strings), parsers on
output captured in a QEMU guest (Debian 6.1.0-57-cloud-amd64, dmsetup 1.02.185), validation,
and the ``dmsetup`` argv of every call through an injected fake ``execute``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import pytest

from brick.dm import (
    DeviceMapper,
    Linear,
    Multipath,
    MultipathMonitor,
    Snapshot,
    SnapshotOrigin,
    Table,
    scsi_path_ready,
)
from brick.dm.dmsetup import DeviceBusy
from brick.dm.parse import (
    INFO_FIELDS,
    DeviceInfo,
    MultipathStatus,
    ParseError,
    PathGroupStatus,
    PathStatus,
    SnapshotStatus,
    TableLine,
    parse_info,
    parse_ls,
    parse_multipath_table,
    parse_status,
    parse_table,
    parse_table_all,
)
from brick.dm.table import Error, Zero, validate_device, validate_name, validate_uuid
from brick.exception import CommandFailed, Conflict, InvalidArgument, NotFound
from tests.unit.fakes.execute import FakeExecute, Reply

# -- real output, captured in the guest ------------------------------------------------------
# dmsetup table (trailing spaces as printed), after:
#   create multipath_volume-cap  "0 32768 multipath 0 0 1 1 queue-length 0 2 1
#          /dev/sda 128 /dev/sdb 128"
#   create mpq "0 32768 multipath 1 queue_if_no_path 0 1 1 round-robin 0 2 1
#          /dev/sda 1000 /dev/sdb 1000"
#   create mps "0 32768 multipath 1 queue_if_no_path 0 1 1 service-time 0 2 2
#          /dev/sda 1 1 /dev/sdb 1 1"
#   create cached_volume-cap "0 32768 cache /dev/loop0 /dev/loop1 /dev/mapper/multipath_volume-cap
#          512 1 writethrough smq 0"
#   create origin_volume-cap "0 32768 snapshot-origin /dev/mapper/cached_volume-cap"
#   create snapshot_vm1 "0 32768 snapshot /dev/mapper/cached_volume-cap /dev/loop2 P 8"
#   create lin2 --uuid VMT-lin2 (3 lines) and lin3 (from stdin, 2 lines)
TABLE_ALL = """\
cached_volume-cap: 0 32768 cache 7:0 7:1 253:0 512 1 writethrough smq 0
lin2: 0 100 linear 7:1 0
lin2: 100 50 error 
lin2: 150 200 linear 7:1 2048
lin3: 0 64 zero 
lin3: 64 64 linear 7:1 8
mpq: 0 32768 multipath 1 queue_if_no_path 0 1 1 round-robin 0 2 1 8:0 1 8:16 1 
mps: 0 32768 multipath 1 queue_if_no_path 0 1 1 service-time 0 2 2 8:0 1 1 8:16 1 1 
multipath_volume-cap: 0 32768 multipath 0 0 1 1 queue-length 0 2 1 8:0 1 8:16 1 
origin_volume-cap: 0 32768 snapshot-origin 253:3
snapshot_vm1: 0 32768 snapshot 253:3 7:2 P 8
"""  # noqa: W291
STATUS_ALL = """\
cached_volume-cap: 0 32768 cache 8 7/2048 512 16/64 130 60 0 0 0 16 0 2 writethrough no_discard_passdown 2 migration_threshold 2048 smq 0 rw - 
lin2: 0 100 linear 
lin2: 100 50 error 
lin2: 150 200 linear 
lin3: 0 64 zero 
lin3: 64 64 linear 
mpq: 0 32768 multipath 2 0 0 0 1 1 A 0 2 0 8:0 A 0 8:16 A 1 
mps: 0 32768 multipath 2 0 0 0 1 1 A 0 2 2 8:0 A 0 0 1 8:16 A 0 0 1 
multipath_volume-cap: 0 32768 multipath 2 0 0 0 1 1 A 0 2 1 8:0 A 0 0 8:16 A 0 0 
origin_volume-cap: 0 32768 snapshot-origin 
snapshot_vm1: 0 32768 snapshot 2072/32768 24
"""  # noqa: W291, E501
# after "dmsetup message mpq 0 fail_path /dev/sdb"
MPQ_STATUS_FAILED = "0 32768 multipath 2 0 0 0 1 1 A 0 2 0 8:0 A 0 8:16 F 1 \n"
# after "dmsetup message mpq 0 fail_if_no_path"
MPQ_TABLE_NOQ = "0 32768 multipath 0 0 1 1 round-robin 0 2 1 8:0 1 8:16 1 \n"
LS = """\
cached_volume-cap\t(253:3)
lin2\t(253:6)
lin3\t(253:7)
mpq\t(253:1)
mps\t(253:2)
multipath_volume-cap\t(253:0)
origin_volume-cap\t(253:4)
snapshot_vm1\t(253:5)
"""
INFO_C = """\
cached_volume-cap||253|3|2|L--w|1
lin2|VMT-lin2|253|6|0|L--w|3
lin3||253|7|0|L--w|2
mpq||253|1|0|L--w|1
mps||253|2|0|L--w|1
multipath_volume-cap||253|0|1|L--w|1
origin_volume-cap||253|4|0|L--w|1
snapshot_vm1||253|5|0|L--w|1
"""
INFO_SUSPENDED = "lin2|VMT-lin2|253|6|0|L-sw|3\n"  # after dmsetup suspend lin2
INFO_INACTIVE = "lin2|VMT-lin2|253|6|0|LI-w|3\n"  # after a reload, before resume
NO_DEVICES = "No devices found\n"
ERR_INFO_MISSING = "Device does not exist.\nCommand failed.\n"
ERR_TABLE_MISSING = (
    "device-mapper: table ioctl on nope  failed: No such device or address\nCommand failed.\n"
)
ERR_REMOVE_MISSING = (
    "device-mapper: remove ioctl on nope  failed: No such device or address\nCommand failed.\n"
)
ERR_REMOVE_BUSY = (
    "device-mapper: remove ioctl on lin3  failed: Device or resource busy\nCommand failed.\n"
)
ERR_CREATE_EXISTS = (
    "device-mapper: create ioctl on lin2  failed: Device or resource busy\nCommand failed.\n"
)
ERR_RELOAD_NODEV = "device-mapper: reload ioctl on lin2  failed: No such device\nCommand failed.\n"

DEVNO = {
    "/dev/sda": "8:0",
    "/dev/sdb": "8:16",
    "/dev/loop0": "7:0",
    "/dev/loop1": "7:1",
    "/dev/loop2": "7:2",
    "/dev/mapper/multipath_volume-cap": "253:0",
    "/dev/mapper/cached_volume-cap": "253:3",
}


def devno(device: str) -> str:
    return DEVNO.get(device, device)


# -- rendering -------------------------------------------------------------------------------
def test_multipath_without_queueing_is_the_originals_line_byte_for_byte() -> None:
    table = Table.of(
        Multipath(length=32768, paths=("/dev/sda", "/dev/sdb"), queue_if_no_path=False)
    )
    # virtman: '0 %d multipath 0 0 1 1 queue-length 0 %d 1 ' % (size, n) + 'disk 128 ' per disk
    assert table.render() == (
        "0 32768 multipath 0 0 1 1 queue-length 0 2 1 /dev/sda 128 /dev/sdb 128\n"
    )


def test_multipath_default_queues_with_no_path() -> None:
    paths = (
        "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.2010-10.org.openstack:volume-a-lun-1",
        "/dev/disk/by-path/ip-10.0.0.2:3260-iscsi-iqn.2010-10.org.openstack:volume-a-lun-1",
    )
    target = Multipath(length=2048, paths=paths)
    assert target.line() == (
        "0 2048 multipath 1 queue_if_no_path 0 1 1 queue-length 0 2 1 "
        f"{paths[0]} 128 {paths[1]} 128"
    )
    listed: Any = ["/dev/sda"]
    assert Multipath(length=8, paths=listed).paths == ("/dev/sda",)  # a list is accepted


def test_multipath_other_selectors() -> None:
    rr = Multipath(length=8, paths=("/dev/sda", "/dev/sdb"), selector="round-robin", repeat=1000)
    assert rr.line() == (
        "0 8 multipath 1 queue_if_no_path 0 1 1 round-robin 0 2 1 /dev/sda 1000 /dev/sdb 1000"
    )
    st = Multipath(length=8, paths=("/dev/sda", "/dev/sdb"), selector="service-time", repeat=1)
    assert st.line() == (
        "0 8 multipath 1 queue_if_no_path 0 1 1 service-time 0 2 2 /dev/sda 1 1 /dev/sdb 1 1"
    )


def test_linear_error_zero_and_a_table_of_several_lines() -> None:
    table = Table.of(
        Linear(length=100, device="/dev/loop1"),
        Error(start=100, length=50),
        Linear(start=150, length=200, device="/dev/loop1", offset=2048),
        Zero(start=350, length=8),
    )
    assert table.render() == (
        "0 100 linear /dev/loop1 0\n100 50 error\n150 200 linear /dev/loop1 2048\n350 8 zero\n"
    )
    assert table.length == 358
    assert table.devices() == ("/dev/loop1",)


def test_snapshot_origin_and_snapshot() -> None:
    origin = SnapshotOrigin(length=32768, origin="/dev/mapper/cached_volume-a")
    assert origin.line() == "0 32768 snapshot-origin /dev/mapper/cached_volume-a"
    snap = Snapshot(length=32768, origin="/dev/mapper/cached_volume-a", cow="/dev/loop3")
    assert snap.line() == "0 32768 snapshot /dev/mapper/cached_volume-a /dev/loop3 P 8"
    # the original's: '0 %d snapshot %s %s N 128' (non-persistent, 64 KiB chunks)
    old = Snapshot(
        length=32768,
        origin="/dev/mapper/origin_volume-a",
        cow="/dev/loop3",
        persistent=False,
        chunk_sectors=128,
    )
    assert old.line() == "0 32768 snapshot /dev/mapper/origin_volume-a /dev/loop3 N 128"


# -- what the kernel prints back -------------------------------------------------------------
def multipath(statuses: Sequence[object]) -> MultipathStatus:
    """The one multipath status of a device."""
    (status,) = statuses
    assert isinstance(status, MultipathStatus)
    return status


def live(name: str) -> list[TableLine]:
    return parse_table_all(TABLE_ALL)[name]


def test_our_targets_match_what_the_kernel_printed() -> None:
    sda_sdb = ("/dev/sda", "/dev/sdb")
    cases = {
        "multipath_volume-cap": Table.of(
            Multipath(length=32768, paths=sda_sdb, queue_if_no_path=False)
        ),
        "mpq": Table.of(
            Multipath(length=32768, paths=sda_sdb, selector="round-robin", repeat=1000)
        ),
        "mps": Table.of(Multipath(length=32768, paths=sda_sdb, selector="service-time", repeat=1)),
        "origin_volume-cap": Table.of(
            SnapshotOrigin(length=32768, origin="/dev/mapper/cached_volume-cap")
        ),
        "snapshot_vm1": Table.of(
            Snapshot(length=32768, origin="/dev/mapper/cached_volume-cap", cow="/dev/loop2")
        ),
        "lin2": Table.of(
            Linear(length=100, device="/dev/loop1"),
            Error(start=100, length=50),
            Linear(start=150, length=200, device="/dev/loop1", offset=2048),
        ),
        "lin3": Table.of(
            Zero(length=64), Linear(start=64, length=64, device="/dev/loop1", offset=8)
        ),
    }
    for name, table in cases.items():
        assert table.matches(live(name), devno), name
    # the kernel shows repeat count 1 whatever was given (request-based multipath)
    mp = cases["multipath_volume-cap"].targets[0]
    assert mp.expected(devno) == live("multipath_volume-cap")[0]


def test_a_different_table_does_not_match() -> None:
    swapped = Table.of(Multipath(length=32768, paths=("/dev/sdb", "/dev/sda")))
    assert not swapped.matches(live("multipath_volume-cap"), devno)
    other_selector = Table.of(
        Multipath(length=32768, paths=("/dev/sda", "/dev/sdb"), selector="round-robin")
    )
    assert not other_selector.matches(live("multipath_volume-cap"), devno)
    shorter = Table.of(Linear(length=100, device="/dev/loop1"))
    assert not shorter.matches(live("lin2"), devno)
    cow = Table.of(Snapshot(length=32768, origin="/dev/mapper/cached_volume-cap", cow="/dev/loop1"))
    assert not cow.matches(live("snapshot_vm1"), devno)


def test_queueing_turned_off_by_a_message_still_matches() -> None:
    table = Table.of(
        Multipath(length=32768, paths=("/dev/sda", "/dev/sdb"), selector="round-robin")
    )
    assert table.matches(parse_table(MPQ_TABLE_NOQ), devno)
    parsed = parse_multipath_table(parse_table(MPQ_TABLE_NOQ)[0].args)
    assert not parsed.queue_if_no_path
    assert parse_multipath_table(live("mpq")[0].args).queue_if_no_path


# -- parsers ---------------------------------------------------------------------------------
def test_parse_table_all_and_one() -> None:
    tables = parse_table_all(TABLE_ALL)
    assert sorted(tables) == sorted(parse_ls(LS))
    assert tables["lin2"] == [
        TableLine(0, 100, "linear", ("7:1", "0")),
        TableLine(100, 50, "error"),
        TableLine(150, 200, "linear", ("7:1", "2048")),
    ]
    assert parse_table("0 32768 snapshot-origin 253:3\n") == [
        TableLine(0, 32768, "snapshot-origin", ("253:3",))
    ]
    assert parse_table_all(NO_DEVICES) == {}


def test_parse_ls() -> None:
    assert parse_ls(LS) == {
        "cached_volume-cap": (253, 3),
        "lin2": (253, 6),
        "lin3": (253, 7),
        "mpq": (253, 1),
        "mps": (253, 2),
        "multipath_volume-cap": (253, 0),
        "origin_volume-cap": (253, 4),
        "snapshot_vm1": (253, 5),
    }
    assert parse_ls(NO_DEVICES) == {}
    assert parse_ls("") == {}
    assert parse_ls("old\t(253, 9)\n") == {"old": (253, 9)}  # older dmsetup's form


def test_parse_info() -> None:
    devices = {d.name: d for d in parse_info(INFO_C)}
    assert devices["lin2"] == DeviceInfo(
        name="lin2",
        uuid="VMT-lin2",
        major=253,
        minor=6,
        open_count=0,
        live=True,
        inactive=False,
        suspended=False,
        readonly=False,
        targets=3,
    )
    assert devices["cached_volume-cap"].open_count == 2
    assert devices["cached_volume-cap"].devno == "253:3"
    (suspended,) = parse_info(INFO_SUSPENDED)
    assert suspended.suspended and not suspended.inactive
    (inactive,) = parse_info(INFO_INACTIVE)
    assert inactive.inactive and not inactive.suspended


def test_parse_status_of_every_kind() -> None:
    statuses = {
        name: parse_status(
            "".join(
                line.partition(": ")[2] + "\n"
                for line in STATUS_ALL.splitlines()
                if line.startswith(name + ": ")
            )
        )
        for name in parse_ls(LS)
    }
    assert statuses["multipath_volume-cap"] == [
        MultipathStatus(
            queueing_io=False,
            pg_init_count=0,
            groups=(
                PathGroupStatus("A", (PathStatus("8:0", True, 0), PathStatus("8:16", True, 0))),
            ),
            next_group=1,
        )
    ]
    mpq, mps = multipath(statuses["mpq"]), multipath(statuses["mps"])
    assert mpq.paths == (PathStatus("8:0", True, 0), PathStatus("8:16", True, 1))
    assert mps.active_paths == mps.paths
    # a target without a typed status (dm-cache here) comes back as its raw line
    (cached,) = statuses["cached_volume-cap"]
    assert isinstance(cached, TableLine) and cached.type == "cache"
    assert cached.args[:2] == ("8", "7/2048")
    assert statuses["snapshot_vm1"] == [SnapshotStatus("ok", 2072, 32768, 24)]
    assert statuses["origin_volume-cap"] == [TableLine(0, 32768, "snapshot-origin")]
    assert [s.type for s in statuses["lin2"] if isinstance(s, TableLine)] == [
        "linear",
        "error",
        "linear",
    ]


def test_parse_multipath_status_with_a_failed_path() -> None:
    status = multipath(parse_status(MPQ_STATUS_FAILED))
    assert status.active_paths == (PathStatus("8:0", True, 0),)
    assert status.failed_paths == (PathStatus("8:16", False, 1),)


def test_parse_dead_snapshots() -> None:
    for word in ("Invalid", "Overflow"):
        (status,) = parse_status(f"0 32768 snapshot {word}\n")
        assert status == SnapshotStatus(word) and not status.valid
    assert parse_status("0 8 snapshot Merge failed\n") == [SnapshotStatus("Merge failed")]


@pytest.mark.parametrize(
    ("parse", "text", "why"),
    [
        (parse_table, "multipath 0 0\n", "expected '<start> <length> <type> ...'"),
        (parse_table_all, "0 8 zero\n", "expected 'name: <table line>'"),
        (parse_ls, "mp 253:0\n", r"expected 'name \(major:minor\)'"),
        (parse_info, "mp|253|0\n", "separated by '|'"),
        (parse_info, "mp||253|0|0|L|1\n", "attr must have 4 flags"),
        (parse_status, "0 8 multipath 2 0 0 0 1 1 A 0 2 0 8:0 A 0\n", "ends too early"),
        (parse_status, "0 8 multipath 2 0 0 0 1 1 A 0 1 0 8:0 X 0\n", "bad path state"),
        (parse_status, "0 8 multipath 2 0 0 0 1 1 A 0 1 0 8:0 A 0 9\n", "trailing fields"),
        (parse_status, "0 8 multipath 1 0 0 1 1 A 0 1 0 8:0 A 0\n", "expected '2 <queue_io>"),
        (parse_status, "0 8 snapshot 12 34 56\n", "expected '<allocated>/<total> <metadata>'"),
    ],
)
def test_parsers_refuse_what_they_do_not_understand(
    parse: Callable[[str], object], text: str, why: str
) -> None:
    with pytest.raises(ParseError, match=why):
        parse(text)


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["multipath_volume-image1", "snapshot_vm-1", "origin_volume-a.b:c", "_x", "a" * 127],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


NAME_RULE = "must be 1-127 of A-Za-z0-9_.:- starting with a letter, digit or _"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-rf",
        "--table",
        ".",
        "..",
        ":x",
        "a/b",
        "a b",
        "a;reboot",
        "$(reboot)",
        "a`id`",
        "a|b",
        "a\nb",
        "a" * 128,
        None,
        7,
    ],
)
def test_invalid_names(name: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_name(name)
    assert str(err.value) == f"invalid name {name!r}: {NAME_RULE}"


def test_uuid_rule() -> None:
    assert validate_uuid("VMT-multipath_volume-a") == "VMT-multipath_volume-a"
    with pytest.raises(InvalidArgument, match="invalid uuid 'VMT x'"):
        validate_uuid("VMT x")
    with pytest.raises(InvalidArgument):
        validate_uuid("V" * 129)


@pytest.mark.parametrize(
    "device",
    [
        "/dev/sda",
        "/dev/mapper/cached_volume-a",
        "/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.2010-10.org.openstack:volume-a-lun-1",
        "/dev/disk/by-path/ip-fd00:99::2:3260-iscsi-iqn.2010-10.org.openstack:volume-a-lun-1",
        "8:16",
        "253:0",
    ],
)
def test_valid_devices(device: str) -> None:
    assert validate_device(device) == device


DEVICE_RULE = "must be a normalised /dev/... path of A-Za-z0-9_.:+@=,- or major:minor"


@pytest.mark.parametrize(
    "device",
    [
        "sda",
        "/tmp/disk",
        "/dev/",
        "/dev//sda",
        "/dev/../etc/passwd",
        "/dev/./sda",
        "/dev/sda/",
        "/dev/sda 0",
        "/dev/sda\n0 8 zero",
        "/dev/sda;reboot",
        "/dev/$(reboot)",
        "/dev/sd'a",
        "8:",
        "8:0:1",
    ],
)
def test_invalid_devices(device: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_device(device)
    assert str(err.value) == f"invalid device {device!r}: {DEVICE_RULE}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Linear(length=0, device="/dev/sda"), "invalid length 0: must be an integer >= 1"),
        (lambda: Linear(length=8, device="/dev/sda", offset=-1), "invalid offset -1"),
        (lambda: Linear(length=True, device="/dev/sda"), "invalid length True"),
        (lambda: Linear(length=8, device="/dev/sda x"), "invalid linear device '/dev/sda x'"),
        (lambda: Multipath(length=8, paths=()), "invalid paths (): must be a non-empty tuple"),
        (lambda: Multipath(length=8, paths=cast(Any, "/dev/sda")), "invalid paths '/dev/sda'"),
        (
            lambda: Multipath(length=8, paths=("/dev/sda", "/dev/sda")),
            "must not repeat a device",
        ),
        (lambda: Multipath(length=8, paths=("/dev/sda",), selector="x"), "invalid selector 'x'"),
        (lambda: Multipath(length=8, paths=("/dev/sda;x",)), "invalid multipath device"),
        (
            lambda: Snapshot(length=8, origin="/dev/sda", cow="/dev/sda"),
            "invalid cow '/dev/sda': must differ from the origin",
        ),
        (
            lambda: Snapshot(length=8, origin="/dev/sda", cow="/dev/sdb", chunk_sectors=12),
            "invalid chunk_sectors 12: must be a power of two 8-2097152",
        ),
    ],
)
def test_targets_validate_their_fields(make: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        make()
    assert message in str(err.value)


def test_tables_must_be_contiguous_from_zero() -> None:
    one = Linear(length=8, device="/dev/sda")
    with pytest.raises(InvalidArgument, match="must be a non-empty tuple of targets"):
        Table(())
    with pytest.raises(InvalidArgument, match="must start at sector 0"):
        Table.of(Linear(start=8, length=8, device="/dev/sda"))
    with pytest.raises(InvalidArgument, match="must start at sector 8"):
        Table.of(one, Linear(start=4, length=8, device="/dev/sdb"))
    with pytest.raises(InvalidArgument, match="must start at sector 8"):
        Table.of(one, Linear(start=16, length=8, device="/dev/sdb"))
    with pytest.raises(InvalidArgument, match="must hold targets"):
        Table(("0 8 zero",))  # type: ignore[arg-type]


# -- DeviceMapper through a fake execute -----------------------------------------------------
INFO = ["dmsetup", "info", "-c", "--noheadings", "--separator", "|", "-o", INFO_FIELDS]


def mapper(fake: FakeExecute, present: set[str] | None = None) -> DeviceMapper:
    present = present if present is not None else set(DEVNO) | {"/dev/mapper/mp"}
    return DeviceMapper(
        execute=fake, devno=devno, block_device=lambda d: d in present, timeout_s=2.0
    )


MP_TABLE = Table.of(Multipath(length=32768, paths=("/dev/sda", "/dev/sdb")))
MP_LIVE = "0 32768 multipath 1 queue_if_no_path 0 1 1 queue-length 0 2 1 8:0 1 8:16 1 \n"


def test_create_runs_dmsetup_create_with_the_table_on_stdin() -> None:
    fake = FakeExecute().on(*INFO, "mp", rc=1, stderr=ERR_INFO_MISSING)
    path = mapper(fake).create("mp", MP_TABLE, uuid="VMT-mp")
    assert path == "/dev/mapper/mp"
    assert fake.calls == [
        ([*INFO, "mp"], None),
        (
            ["dmsetup", "create", "mp", "--uuid", "VMT-mp"],
            "0 32768 multipath 1 queue_if_no_path 0 1 1 queue-length 0 2 1 "
            "/dev/sda 128 /dev/sdb 128\n",
        ),
    ]


def test_create_readonly_flag() -> None:
    fake = FakeExecute().on(*INFO, "mp", rc=1, stderr=ERR_INFO_MISSING)
    mapper(fake).create("mp", MP_TABLE, readonly=True)
    assert fake.argvs[-1] == ["dmsetup", "create", "mp", "--readonly"]


def test_create_adopts_the_same_table_and_refuses_another() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "mp", stdout="mp|VMT-mp|253|0|1|L--w|1\n")
        .on("dmsetup", "table", "mp", stdout=MP_LIVE)
    )
    assert mapper(fake).create("mp", MP_TABLE, uuid="VMT-mp") == "/dev/mapper/mp"
    assert not any(argv[1] == "create" for argv in fake.argvs)

    other = Table.of(Multipath(length=32768, paths=("/dev/sdb", "/dev/sda")))
    with pytest.raises(Conflict) as err:
        mapper(fake).create("mp", other)
    assert str(err.value) == (
        "device-mapper device 'mp' exists and differs: live table is '0 32768 multipath 1 "
        "queue_if_no_path 0 1 1 queue-length 0 2 1 8:0 1 8:16 1'"
    )
    with pytest.raises(Conflict, match="uuid 'VMT-mp', not 'VMT-other'"):
        mapper(fake).create("mp", MP_TABLE, uuid="VMT-other")


def test_create_adopts_a_device_made_meanwhile() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "mp", rc=1, stderr=ERR_INFO_MISSING, times=1)
        .on("dmsetup", "create", rc=1, stderr=ERR_CREATE_EXISTS)
        .on(*INFO, "mp", stdout="mp||253|0|0|L--w|1\n")
        .on("dmsetup", "table", "mp", stdout=MP_LIVE)
    )
    assert mapper(fake).create("mp", MP_TABLE) == "/dev/mapper/mp"


def test_create_failure_carries_the_table() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "mp", rc=1, stderr=ERR_INFO_MISSING)
        .on("dmsetup", "create", rc=1, stderr=ERR_RELOAD_NODEV)
    )
    with pytest.raises(CommandFailed) as err:
        mapper(fake).create("mp", MP_TABLE)
    assert "table: '0 32768 multipath" in err.value.__notes__[0]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda m: m.create("bad name", MP_TABLE), InvalidArgument),
        (lambda m: m.create("mp", MP_TABLE, uuid="x y"), InvalidArgument),
        (lambda m: m.create("mp", "0 8 zero"), InvalidArgument),
        (lambda m: m.create("mp", Table.of(Linear(length=8, device="/dev/sdz"))), NotFound),
        (lambda m: m.reload("-x", MP_TABLE), InvalidArgument),
        (lambda m: m.reload("mp", Table.of(Linear(length=8, device="/dev/sdz"))), NotFound),
        (lambda m: m.remove("a/b"), InvalidArgument),
        (lambda m: m.table("$(id)"), InvalidArgument),
        (lambda m: m.status("a b"), InvalidArgument),
        (lambda m: m.size("/dev/sda;reboot"), InvalidArgument),
        (lambda m: m.size("8:0"), InvalidArgument),
        (lambda m: m.reinstate_path("mp", "/dev/sd a"), InvalidArgument),
        (lambda m: m.set_queue_if_no_path("mp", "yes"), InvalidArgument),
        (lambda m: m.switch_group("mp", 0), InvalidArgument),
        (lambda m: m.switch_group("-mp", 1), InvalidArgument),
    ],
)
def test_nothing_runs_before_validation(
    call: Callable[[DeviceMapper], object], error: type[Exception]
) -> None:
    fake = FakeExecute()
    with pytest.raises(error):
        call(mapper(fake))
    assert fake.calls == []


def test_create_refuses_a_missing_device_by_name() -> None:
    fake = FakeExecute()
    with pytest.raises(NotFound) as err:
        mapper(fake).create("mp", Table.of(Linear(length=8, device="/dev/sdz")))
    assert str(err.value) == "block device '/dev/sdz' does not exist"


def test_reload_suspends_noflush_loads_and_resumes() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "mp", stdout="mp||253|0|1|L--w|1\n")
        .on("dmsetup", "table", "mp", stdout=MP_LIVE)
    )
    one = Table.of(Multipath(length=32768, paths=("/dev/sda",)))
    mapper(fake).reload("mp", one)
    assert fake.calls[1:] == [
        (["dmsetup", "suspend", "--noflush", "mp"], None),
        (
            ["dmsetup", "reload", "mp"],
            "0 32768 multipath 1 queue_if_no_path 0 1 1 queue-length 0 1 1 /dev/sda 128\n",
        ),
        (["dmsetup", "resume", "mp"], None),
    ]


def test_reload_of_a_linear_table_flushes_and_clears_a_stale_inactive_table() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "lin2", stdout=INFO_INACTIVE)
        .on("dmsetup", "table", "lin2", stdout="0 16 zero \n")
    )
    mapper(fake).reload("lin2", Table.of(Zero(length=32)))
    assert fake.argvs[2:] == [
        ["dmsetup", "clear", "lin2"],
        ["dmsetup", "suspend", "lin2"],
        ["dmsetup", "reload", "lin2"],
        ["dmsetup", "resume", "lin2"],
    ]


def test_reload_resumes_when_the_load_fails() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "lin2", stdout="lin2|VMT-lin2|253|6|0|L--w|3\n")
        .on("dmsetup", "table", "lin2", stdout="0 16 zero \n")
        .on("dmsetup", "reload", rc=1, stderr=ERR_RELOAD_NODEV)
    )
    with pytest.raises(CommandFailed) as err:
        mapper(fake).reload("lin2", Table.of(Linear(length=8, device="/dev/loop1")))
    assert err.value.exit_code == 1
    assert err.value.__notes__ == ["lin2 keeps its old table (resumed)"]
    assert fake.argvs[-1] == ["dmsetup", "resume", "lin2"]


def test_reload_of_a_missing_device() -> None:
    fake = FakeExecute().on(*INFO, "mp", rc=1, stderr=ERR_INFO_MISSING)
    with pytest.raises(NotFound, match="device-mapper device 'mp' does not exist"):
        mapper(fake).reload("mp", MP_TABLE)
    assert len(fake.calls) == 1


def test_remove_is_idempotent() -> None:
    fake = FakeExecute().on("dmsetup", "remove", rc=1, stderr=ERR_REMOVE_MISSING)
    assert mapper(fake).remove("nope") is True
    assert fake.argvs == [["dmsetup", "remove", "nope"]]


def test_remove_retries_a_device_busy_for_a_moment() -> None:
    fake = FakeExecute().on("dmsetup", "remove", rc=1, stderr=ERR_REMOVE_BUSY, times=2)
    assert mapper(fake).remove("lin3", retry_s=5.0) is True
    assert fake.argvs == [["dmsetup", "remove", "lin3"]] * 3


def test_remove_of_a_device_kept_open() -> None:
    fake = (
        FakeExecute()
        .on("dmsetup", "remove", "--deferred")
        .on("dmsetup", "remove", rc=1, stderr=ERR_REMOVE_BUSY)
        .on(*INFO, "lin3", stdout="lin3||253|7|1|L--w|2\n")
    )
    with pytest.raises(DeviceBusy) as err:
        mapper(fake).remove("lin3", retry_s=0.05)
    assert str(err.value) == "device-mapper device 'lin3' is busy (open count 1)"
    assert isinstance(err.value.__cause__, CommandFailed)
    assert mapper(fake).remove("lin3", retry_s=0.05, deferred=True) is False
    assert fake.argvs[-1] == ["dmsetup", "remove", "--deferred", "lin3"]


def test_remove_raises_other_failures_at_once() -> None:
    fake = FakeExecute().on("dmsetup", "remove", rc=1, stderr="Command failed.\n")
    with pytest.raises(CommandFailed):
        mapper(fake).remove("lin3", retry_s=5.0)
    assert len(fake.calls) == 1


def test_queries() -> None:
    fake = (
        FakeExecute()
        .on("dmsetup", "table", "nope", rc=1, stderr=ERR_TABLE_MISSING)
        .on("dmsetup", "status", "nope", rc=1, stderr=ERR_INFO_MISSING)
        .on("dmsetup", "table", "lin2", stdout="0 100 linear 7:1 0\n")
        .on("dmsetup", "status", "mpq", stdout=MPQ_STATUS_FAILED)
        .on("dmsetup", "ls", stdout=LS)
        .on(*INFO, "nope", rc=1, stderr=ERR_INFO_MISSING)
        .on(*INFO, "lin2", stdout="lin2|VMT-lin2|253|6|0|L--w|3\n")
        .on(*INFO, stdout=INFO_C)
    )
    m = mapper(fake)
    with pytest.raises(NotFound):
        m.table("nope")
    with pytest.raises(NotFound):
        m.status("nope")
    assert m.table("lin2") == [TableLine(0, 100, "linear", ("7:1", "0"))]
    assert m.multipath_status("mpq").failed_paths == (PathStatus("8:16", False, 1),)
    assert m.list() == sorted(parse_ls(LS))
    assert m.exists("lin2") and not m.exists("nope")
    assert [d.uuid for d in m.list_info() if d.uuid] == ["VMT-lin2"]
    assert fake.argvs[:2] == [["dmsetup", "table", "nope"], ["dmsetup", "status", "nope"]]


def test_size_uses_blockdev() -> None:
    fake = FakeExecute().on("blockdev", "--getsz", "/dev/sda", stdout="32768\n")
    assert mapper(fake).size("/dev/sda") == 32768
    assert fake.argvs == [["blockdev", "--getsz", "/dev/sda"]]
    with pytest.raises(ParseError, match="expected a positive sector count"):
        mapper(FakeExecute().on("blockdev", stdout="0\n")).size("/dev/sda")


def test_multipath_messages() -> None:
    fake = FakeExecute()
    m = mapper(fake)
    m.set_queue_if_no_path("mp", False)
    m.set_queue_if_no_path("mp", True)
    m.fail_path("mp", "8:16")
    m.reinstate_path("mp", "/dev/sdb")
    m.switch_group("mp", 1)
    assert fake.argvs == [
        ["dmsetup", "message", "mp", "0", "fail_if_no_path"],
        ["dmsetup", "message", "mp", "0", "queue_if_no_path"],
        ["dmsetup", "message", "mp", "0", "fail_path", "8:16"],
        ["dmsetup", "message", "mp", "0", "reinstate_path", "/dev/sdb"],
        ["dmsetup", "message", "mp", "0", "switch_group", "1"],
    ]


def test_next_group_is_parsed() -> None:
    two_groups = "0 8 multipath 2 0 0 0 2 2 E 0 1 0 8:0 F 1 A 0 1 0 8:16 A 0\n"
    status = multipath(parse_status(two_groups))
    assert status.next_group == 2
    assert [g.state for g in status.groups] == ["E", "A"]
    before_io = multipath(parse_status("0 8 multipath 2 0 0 0 1 0 E 0 1 0 8:0 A 0\n"))
    assert before_io.next_group == 0


# -- MultipathMonitor: bounded queueing and reinstatement ------------------------------------
def mp_status(*states: str) -> str:
    paths = " ".join(
        f"{dev} {state} 0" for dev, state in zip(("8:0", "8:16"), states, strict=False)
    )
    return f"0 32768 multipath 2 0 0 0 1 1 A 0 {len(states)} 0 {paths} \n"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_monitor_fails_queued_io_after_no_path_retry_and_queues_again_when_a_path_returns() -> None:
    fake = FakeExecute()
    ready: set[str] = set()
    clock = Clock()
    monitor = MultipathMonitor(
        mapper(fake), "mp", no_path_retry_s=10, path_ready=lambda d: d in ready, clock=clock
    )

    def check(*states: str) -> list[list[str]]:
        fake.replies = [Reply(("dmsetup", "status", "mp"), stdout=mp_status(*states))]
        fake.calls.clear()
        monitor.check()
        return [argv for argv in fake.argvs if argv[1] == "message"]

    assert check("A", "A") == []
    assert check("F", "F") == []  # no path: queueing starts
    clock.now += 9
    assert check("F", "F") == []
    clock.now += 1
    assert check("F", "F") == [["dmsetup", "message", "mp", "0", "fail_if_no_path"]]
    clock.now += 60
    assert check("F", "F") == []  # once
    ready.add("8:16")
    assert check("F", "F") == [
        ["dmsetup", "message", "mp", "0", "reinstate_path", "8:16"],
        ["dmsetup", "message", "mp", "0", "queue_if_no_path"],
    ]
    assert check("F", "A") == []
    clock.now += 5
    ready.clear()
    assert check("F", "F") == []  # a new outage starts a new bound
    clock.now += 9
    assert check("F", "F") == []


def test_monitor_reinstates_a_path_that_is_back() -> None:
    fake = FakeExecute().on("dmsetup", "status", "mp", stdout=MPQ_STATUS_FAILED)
    monitor = MultipathMonitor(mapper(fake), "mp", path_ready=lambda d: d == "8:16")
    status = monitor.check()
    assert status.failed_paths == (PathStatus("8:16", False, 1),)
    assert fake.argvs[-1] == ["dmsetup", "message", "mp", "0", "reinstate_path", "8:16"]


def test_scsi_path_ready_reads_sysfs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "dev" / "block" / "8:16" / "device" / "state"
    state.parent.mkdir(parents=True)
    state.write_text("running\n")
    assert scsi_path_ready("8:16", str(tmp_path))
    state.write_text("transport-offline\n")
    assert not scsi_path_ready("8:16", str(tmp_path))
    assert not scsi_path_ready("8:0", str(tmp_path))


# -- read-only paths (a read-only LUN's disk refuses a read-write multipath: -EROFS) ---------
ERR_CREATE_EROFS = (
    "device-mapper: reload ioctl on mpA (253:0) failed: Read-only file system\nCommand failed.\n"
)


def test_read_only_devices() -> None:
    fake = FakeExecute().on("blockdev", "--getro", "/dev/sda", stdout="1\n")
    fake.on("blockdev", "--getro", stdout="0\n")
    m = mapper(fake)
    assert m.read_only("/dev/sda") is True and m.read_only("/dev/sdb") is False
    assert fake.argvs == [["blockdev", "--getro", "/dev/sda"], ["blockdev", "--getro", "/dev/sdb"]]
    with pytest.raises(ParseError):
        mapper(FakeExecute().on("blockdev", stdout="yes\n")).read_only("/dev/sda")


def test_a_read_only_device_is_adopted_only_as_read_only_and_reloaded_read_only() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "mp", stdout="mp|VMT-mp|253|0|1|L--r|1\n")
        .on("dmsetup", "table", "mp", stdout=MP_LIVE)
    )
    m = mapper(fake)
    assert m.create("mp", MP_TABLE, uuid="VMT-mp", readonly=True) == "/dev/mapper/mp"
    with pytest.raises(Conflict, match="it is read-only"):
        m.create("mp", MP_TABLE, uuid="VMT-mp")
    fake.calls.clear()
    m.reload("mp", MP_TABLE)
    assert fake.argvs[1:] == [
        ["dmsetup", "suspend", "--noflush", "mp"],
        ["dmsetup", "reload", "--readonly", "mp"],
        ["dmsetup", "resume", "mp"],
    ]


def test_a_read_write_table_over_read_only_paths_fails_with_the_kernels_words() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "mp", rc=1, stderr=ERR_INFO_MISSING)
        .on("dmsetup", "create", rc=1, stderr=ERR_CREATE_EROFS)
    )
    with pytest.raises(CommandFailed) as err:
        mapper(fake).create("mp", MP_TABLE)
    assert "Read-only file system" in err.value.stderr


def test_errors_name_the_kernels_reason_not_dmsetups_last_line() -> None:
    fake = (
        FakeExecute()
        .on(*INFO, "mpA", rc=1, stderr=ERR_INFO_MISSING)
        .on("dmsetup", "create", rc=1, stderr=ERR_CREATE_EROFS)
    )
    with pytest.raises(CommandFailed) as err:
        mapper(fake).create("mpA", MP_TABLE)
    assert str(err.value) == (
        "dmsetup exited with 1: device-mapper: reload ioctl on mpA (253:0) failed: "
        "Read-only file system"
    )
    assert err.value.argv == ["dmsetup", "create", "mpA"]
