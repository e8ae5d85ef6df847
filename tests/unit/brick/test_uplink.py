"""brick.uplink: the tc argv, the reconcile plan (pure), tc output read back, and the rules
about whose qdisc is touched. The real kernel state: tests/functional/test_uplink.py."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

import pytest

from brick import uplink
from brick.exception import BrickError, CommandFailed, Conflict, InvalidArgument
from brick.executor import Result

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"

A, B, C = "10.244.0.2", "10.244.0.3", "10.244.0.4"
V6 = "fd00::9"
DEV = ["dev", "eth0"]


class FakeTc:
    """Records every argv; answers ``qdisc show`` with ``root`` and the other shows with
    the given text; fails the argv equal to ``fail``."""

    def __init__(self, root: str = "qdisc noqueue 0: root refcnt 2\n") -> None:
        self.calls: list[list[str]] = []
        self.root = root
        self.shows: dict[str, str] = {"class": "", "filter": ""}
        self.fail: list[str] | None = None

    def __call__(self, argv: Sequence[str], **_kw: object) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        if argv == self.fail:
            raise CommandFailed(argv, 2, "RTNETLINK answers: No such file or directory")
        if argv[2:3] == ["show"]:
            text = self.root if argv[1] == "qdisc" else self.shows[argv[1]]
            return Result(text, "", 0)
        return Result("", "", 0)

    def changes(self) -> list[list[str]]:
        return [c for c in self.calls if c[2] != "show"]


def leaf(op: str, minor: str, prio: int, floor: str = "1000kbit") -> list[str]:
    return ["tc", "class", op, *DEV, "parent", "7674:1", "classid", f"7674:{minor}", "htb",
            "rate", floor, "ceil", "50mbit", "prio", str(prio)]  # fmt: skip


def filt(address: str, pref: int, minor: str) -> list[str]:
    return ["tc", "filter", "add", *DEV, "parent", "7674:", "protocol", "ip", "prio", str(pref),
            "u32", "match", "ip", "dst", f"{address}/32", "flowid", f"7674:{minor}"]  # fmt: skip


def fdel(pref: int) -> list[str]:
    return ["tc", "filter", "del", *DEV, "parent", "7674:", "prio", str(pref)]


BASE = [
    ["tc", "qdisc", "add", *DEV, "root", "handle", "7674:", "htb", "default", "2"],
    ["tc", "class", "add", *DEV, "parent", "7674:", "classid", "7674:1", "htb", "rate", "50mbit",
     "ceil", "50mbit"],
    leaf("add", "2", 0),
]  # fmt: skip


def test_first_apply_builds_the_qdisc_classes_and_filters_in_order() -> None:
    tc = FakeTc()
    up = uplink.Uplink("eth0", 50, run=tc)
    assert up.floor_kbit == 1000  # 1 % of 50 Mbit/s is below 1 Mbit/s: the minimum
    assert up.apply([A, B]) == 7
    assert tc.calls == [
        ["tc", "qdisc", "show", *DEV],
        *BASE,
        leaf("add", "10", 1),
        leaf("add", "11", 2),
        filt(A, 10, "10"),
        filt(B, 11, "11"),
    ]


def test_a_second_apply_with_the_same_readers_runs_no_command() -> None:
    tc = FakeTc()
    up = uplink.Uplink("eth0", 50, run=tc)
    up.apply([A, B])
    tc.calls.clear()
    assert up.apply([A, B]) == 0
    assert up.apply(["10.244.0.2", "::ffff:10.244.0.3", A]) == 0  # the same, spelled otherwise
    assert tc.calls == []


def test_two_then_three_then_two_readers() -> None:
    tc = FakeTc()
    up = uplink.Uplink("eth0", 50, run=tc)
    up.apply([A, B])
    tc.calls.clear()
    assert up.apply([A, B, C]) == 2
    assert tc.calls == [leaf("add", "12", 3), filt(C, 12, "12")]
    tc.calls.clear()
    # B leaves: C moves up to slot 1, slot 2's class goes
    assert up.apply([A, C]) == 4
    assert tc.calls == [
        fdel(11),
        fdel(12),
        filt(C, 11, "11"),
        ["tc", "class", "del", *DEV, "classid", "7674:12"],
    ]
    assert up.readers == [ipaddress.ip_address(A), ipaddress.ip_address(C)]


def test_reorder_moves_only_the_filters() -> None:
    state = uplink.State()
    _, state = uplink.plan(state, [ipaddress.ip_address(A), ipaddress.ip_address(B)])
    commands, new = uplink.plan(state, [ipaddress.ip_address(B), ipaddress.ip_address(A)])
    assert [c[:2] for c in commands] == [["filter", "del"]] * 2 + [["filter", "add"]] * 2
    assert new.slots == {0, 1}
    assert new.filter_map() == {
        ipaddress.ip_address(B): uplink.Filter(10, 0),
        ipaddress.ip_address(A): uplink.Filter(11, 1),
    }
    # nothing to do: no command
    assert uplink.plan(new, [ipaddress.ip_address(B), ipaddress.ip_address(A)]) == ([], new)


def test_no_reader_left_removes_every_reader_class_and_filter() -> None:
    tc = FakeTc()
    up = uplink.Uplink("eth0", 50, run=tc)
    up.apply([A, B])
    tc.calls.clear()
    assert up.apply([]) == 4
    assert tc.calls == [
        fdel(10),
        fdel(11),
        ["tc", "class", "del", *DEV, "classid", "7674:10"],
        ["tc", "class", "del", *DEV, "classid", "7674:11"],
    ]
    assert up.state == uplink.State()


def test_ipv6_reader_gets_an_ip6_filter() -> None:
    tc = FakeTc()
    up = uplink.Uplink("eth0", 50, netns="vmtu-p", run=tc)
    up.apply([V6, "[fd00::a]"])
    assert tc.changes()[-2:] == [
        ["tc", "-n", "vmtu-p", "filter", "add", *DEV, "parent", "7674:", "protocol", "ipv6",
         "prio", "10", "u32", "match", "ip6", "dst", "fd00::9/128", "flowid", "7674:10"],
        ["tc", "-n", "vmtu-p", "filter", "add", *DEV, "parent", "7674:", "protocol", "ipv6",
         "prio", "11", "u32", "match", "ip6", "dst", "fd00::a/128", "flowid", "7674:11"],
    ]  # fmt: skip


def test_prio_is_capped_at_htbs_seven_and_readers_at_the_maximum() -> None:
    assert [uplink.slot_prio(s) for s in range(9)] == [1, 2, 3, 4, 5, 6, 7, 7, 7]
    many = [str(ipaddress.ip_address("10.1.0.0") + i) for i in range(uplink.MAX_READERS + 5)]
    assert len(uplink.ordered(many)) == uplink.MAX_READERS


def test_floor_default_and_limits() -> None:
    assert uplink.default_floor_kbit(1000) == 10000
    assert uplink.Uplink("eth0", 10000, run=FakeTc()).floor_kbit == 100000
    assert uplink.Uplink("eth0", 200, 4000, run=FakeTc()).floor_kbit == 4000
    for mbit, floor in ((0, None), (True, None), ("50", None), (50, 0), (50, 5001), (50, 1.5)):
        with pytest.raises(InvalidArgument):
            uplink.Uplink("eth0", mbit, floor, run=FakeTc())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "device", ["", "eth0; reboot", "a" * 16, "-eth0", "eth 0", "../x", "ethé", None, 3]
)
def test_bad_device_names_are_refused(device: object) -> None:
    with pytest.raises(InvalidArgument):
        uplink.validate_device(device)


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1/32", "10.0.0.1; rm", "node1", "fe80::1%eth0", "", None, 167772161, "10.0.0.256"],
)
def test_bad_reader_addresses_are_refused(address: object) -> None:
    with pytest.raises(InvalidArgument):
        uplink.reader_address(address)
    with pytest.raises(InvalidArgument):
        uplink.Uplink("eth0", 50, run=FakeTc()).apply([A, address])


def test_an_apply_refused_for_a_bad_address_runs_nothing() -> None:
    tc = FakeTc()
    with pytest.raises(InvalidArgument):
        uplink.Uplink("eth0", 50, run=tc).apply([A, "x"])
    assert tc.calls == []


def test_someone_elses_root_qdisc_is_left_alone() -> None:
    tc = FakeTc(root="qdisc tbf 8001: root refcnt 2 rate 50Mbit burst 512Kb lat 50ms\n")
    up = uplink.Uplink("eth0", 50, run=tc)
    with pytest.raises(Conflict, match="not ours"):
        up.apply([A])
    assert not up.remove()
    assert tc.changes() == []
    # an htb of someone else's (another handle) too
    tc.root = "qdisc htb 1: root refcnt 2 r2q 10 default 0x30\n"
    with pytest.raises(Conflict):
        up.apply([A])
    assert tc.changes() == []


def test_remove_deletes_only_our_qdisc() -> None:
    tc = FakeTc()
    up = uplink.Uplink("eth0", 50, run=tc)
    up.apply([A])
    tc.root = "qdisc htb 7674: root refcnt 2 r2q 10 default 0x2 direct_packets_stat 0\n"
    tc.calls.clear()
    assert up.remove()
    assert tc.changes() == [["tc", "qdisc", "del", *DEV, "root", "handle", "7674:"]]
    assert up.state is None and up.readers == []


def test_a_failed_command_makes_the_next_apply_read_the_kernel_again() -> None:
    tc = FakeTc()
    up = uplink.Uplink("eth0", 50, run=tc)
    up.apply([A])
    tc.fail = filt(B, 11, "11")
    with pytest.raises(CommandFailed):
        up.apply([A, B])
    assert up.state is None
    tc.fail = None
    tc.root = "qdisc htb 7674: root refcnt 2 r2q 10 default 0x2\n"
    tc.shows["class"] = CLASSES
    tc.shows["filter"] = FILTERS.split("filter protocol ip pref 11")[0]  # only A's filter
    tc.calls.clear()
    up.apply([A, B])
    assert tc.changes()[-1] == filt(B, 11, "11")


# Captured from `tc class show` / `tc filter show ... parent 7674:` (iproute2 6.1, 2026-12-07) with
# readers 10.244.0.2, 10.244.0.3 and fd00::9 (slot 2's class line left out). 6.1 prints "*flowid".
CLASSES = (DATA / "tc-class-show.txt").read_text()
FILTERS = (DATA / "tc-filter-show.txt").read_text()
FILTERS_V6 = (DATA / "tc-filter-show-v6.txt").read_text()


def test_parse_reads_the_filters_back() -> None:
    assert uplink.parse_filters(FILTERS + FILTERS_V6) == [
        uplink.ShownFilter(10, "7674:10", ipaddress.ip_address(A)),
        uplink.ShownFilter(11, "7674:11", ipaddress.ip_address(B)),
        uplink.ShownFilter(12, "7674:12", ipaddress.ip_address(V6)),
    ]
    assert uplink.parse_classes(CLASSES) == {0x1, 0x2, 0x10, 0x11}
    assert uplink.root_qdisc("qdisc noqueue 0: root refcnt 2 \n") == ("noqueue", 0)
    assert uplink.root_qdisc("qdisc htb 7674: root refcnt 2 r2q 10\n") == ("htb", 0x7674)
    assert uplink.root_qdisc("") is None


def test_a_filter_that_is_not_one_address_reads_as_none() -> None:
    text = FILTERS.replace("0af40003/ffffffff", "0af40000/ffffff00")
    assert uplink.parse_filters(text)[1].address is None


def test_adopt_takes_over_our_qdisc_as_it_is() -> None:
    tc = FakeTc(root="qdisc htb 7674: root refcnt 2 r2q 10 default 0x2\n")
    tc.shows = {"class": CLASSES, "filter": FILTERS}
    up = uplink.Uplink("eth0", 50, run=tc)
    assert up.adopt()
    assert up.readers == [ipaddress.ip_address(A), ipaddress.ip_address(B)]
    # every class brought to this object's rates, nothing else
    assert [c[1:3] for c in tc.changes()] == [["class", "replace"]] * 4
    tc.calls.clear()
    assert up.apply([A, B]) == 0
    assert tc.calls == []


def test_adopt_drops_filters_that_are_not_ours() -> None:
    tc = FakeTc(root="qdisc htb 7674: root refcnt 2 r2q 10 default 0x2\n")
    stray = FILTERS.replace("0af40003/ffffffff", "0af40000/ffffff00")
    tc.shows = {"class": CLASSES, "filter": stray}
    up = uplink.Uplink("eth0", 50, run=tc)
    assert up.adopt()
    assert up.readers == [ipaddress.ip_address(A)]
    assert tc.changes()[-1] == fdel(11)


def test_adopt_refuses_a_root_that_is_not_ours() -> None:
    tc = FakeTc()
    up = uplink.Uplink("eth0", 50, run=tc)
    assert not up.adopt()
    assert tc.changes() == []


IP_ADDR = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0    inet 10.244.0.1/24 brd 10.244.0.255 scope global eth0\\       valid_lft forever
2: eth0    inet6 fd00::1/64 scope global \\       valid_lft forever preferred_lft forever
5: veth1@if4    inet 10.9.0.1/24 scope global veth1\\       valid_lft forever
"""


def test_device_of_finds_the_device_carrying_the_address() -> None:
    def run(argv: Sequence[str], **_kw: object) -> Result:
        assert list(argv) == ["ip", "-o", "addr", "show"]
        return Result(IP_ADDR, "", 0)

    assert uplink.device_of("10.244.0.1", run=run) == "eth0"
    assert uplink.device_of("fd00::1", run=run) == "eth0"
    assert uplink.device_of("10.9.0.1", run=run) == "veth1"
    with pytest.raises(BrickError, match="no device carries"):
        uplink.device_of("10.244.0.7", run=run)


def test_link_speed_from_sysfs(tmp_path: Path) -> None:
    for dev, text in (("eth0", "1000\n"), ("veth0", "-1\n"), ("bad", "x\n")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "speed").write_text(text)
    assert uplink.link_speed_mbit("eth0", tmp_path) == 1000
    assert uplink.link_speed_mbit("veth0", tmp_path) is None
    assert uplink.link_speed_mbit("bad", tmp_path) is None
    assert uplink.link_speed_mbit("gone", tmp_path) is None
