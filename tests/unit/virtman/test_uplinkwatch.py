"""virtman.uplinkwatch: readers ranked by first appearance, who counts as a reader, the
poll applying the order (a fake tc), and the options' errors."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import SimpleNamespace

import pytest

from brick import proc, uplink
from brick.tgt.parse import Connection, Target
from brick.wait import wait_until
from tests.unit.brick.test_uplink import FakeTc
from virtman import uplinkwatch

pytestmark = pytest.mark.unit

A, B, C = "10.244.0.2", "10.244.0.3", "10.244.0.4"


def test_order_of_first_appearance_is_kept_across_polls() -> None:
    order = uplinkwatch.ReaderOrder()
    assert order.update([B, A]) == [B, A]
    assert order.update([A, B]) == [B, A]  # the same readers listed otherwise: no change
    assert order.update([A, C, B]) == [B, A, C]  # a new one goes last
    assert order.update([C, A]) == [A, C]  # B left: it drops out
    assert order.update([B, A, C]) == [A, C, B]  # B came back: last
    assert order.update([A, A, C, B]) == [A, C, B]  # two sessions of one reader: one place
    assert order.update([]) == []


class FakeTgt:
    def __init__(self, targets: list[Target]) -> None:
        self.list = targets

    def targets(self) -> list[Target]:
        return self.list


def target(tid: int, *connections: tuple[str, int]) -> Target:
    conns = tuple(Connection(f"iqn.2010-10.org.openstack:n{n}", a, n) for a, n in connections)
    return Target(tid, f"iqn.2010-10.org.openstack:volume-{tid}", connections=conns)


def test_readers_are_every_targets_initiators_oldest_session_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tgt = FakeTgt([target(1, (B, 7), ("127.0.0.1", 2)), target(2, (A, 3), ("10.244.0.1", 9))])
    peers = {10809: [C, "::1", "fd00::9"], 3260: [B, "10.244.0.9"]}
    monkeypatch.setattr(uplinkwatch, "established_peers", lambda port: peers[port])
    # loopback and the node's own address left out: their reads do not cross the uplink
    assert uplinkwatch.node_readers(tgt, (10809,), ["10.244.0.1"]) == [A, B, C, "fd00::9"]
    assert uplinkwatch.node_readers(tgt, (), ["10.244.0.1"]) == [A, B]
    # LIO's readers (iscsi_port's peers) after tgtd's; a reader twice keeps its first place
    got = uplinkwatch.node_readers(tgt, (3260,), ["10.244.0.1"])
    assert got == [A, B, B, "10.244.0.9"]
    assert uplinkwatch.ReaderOrder().update(got) == [A, B, "10.244.0.9"]


def test_poll_applies_the_order_and_an_unchanged_one_runs_nothing() -> None:
    tc = FakeTc()
    present = [[A, B]]
    watch = uplinkwatch.UplinkWatch(uplink.Uplink("eth0", 50, run=tc), lambda: present[0])
    assert watch.poll() == 7
    assert watch.poll() == 0
    present[0] = [B, C, A]  # order of the listing does not matter, arrival does
    assert watch.poll() == 2
    assert watch.link.readers == [ipaddress.ip_address(x) for x in (A, B, C)]
    present[0] = [C, A]
    watch.poll()
    assert watch.link.readers == [ipaddress.ip_address(x) for x in (A, C)]


def test_start_adopts_polls_and_stop_removes() -> None:
    tc = FakeTc()
    rounds: list[int] = []

    def readers() -> list[str]:
        rounds.append(1)
        return [A]

    watch = uplinkwatch.UplinkWatch(
        uplink.Uplink("eth0", 50, run=tc), readers, interval_s=0.01
    ).start()
    try:
        assert watch._rounds.running
        assert watch.link.readers == [ipaddress.ip_address(A)]
        wait_until(lambda: len(rounds) >= 5, timeout_s=5, what="5 rounds")
        assert len(tc.changes()) == 5  # the first round's; the others ran nothing
    finally:
        tc.root = "qdisc htb 7674: root refcnt 2 r2q 10 default 0x2\n"
        watch.stop()
    assert not watch._rounds.running
    assert tc.changes()[-1] == ["tc", "qdisc", "del", "dev", "eth0", "root", "handle", "7674:"]


def test_a_failing_round_is_logged_and_the_watch_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def readers() -> list[str]:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("tgtd gone")
        return [A]

    tc = FakeTc()
    watch = uplinkwatch.UplinkWatch(uplink.Uplink("eth0", 50, run=tc), readers, interval_s=0.01)
    watch.start()
    try:
        wait_until(lambda: len(calls) >= 4, timeout_s=5, what="4 rounds")
    finally:
        watch.stop()
    assert len(calls) >= 4
    assert "round failed" in caplog.text


def conf(**over: object) -> SimpleNamespace:
    base = {
        "uplink_priority": True,
        "uplink_device": "eth0",
        "uplink_mbit": 1000,
        "uplink_floor_kbit": 0,
    }
    return SimpleNamespace(**{**base, **over})


def test_from_conf_off_builds_nothing() -> None:
    assert uplinkwatch.from_conf(conf(uplink_priority=False), A, FakeTgt([]), (10809,)) is None


def test_from_conf_builds_the_watch() -> None:
    watch = uplinkwatch.from_conf(conf(), A, FakeTgt([target(1, (A, 1), (B, 2))]), ())
    assert watch is not None
    assert (watch.link.device, watch.link.mbit, watch.link.floor_kbit) == ("eth0", 1000, 10000)
    assert watch.readers() == [B]  # the node's own address is not a reader


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"uplink_device": "eth0;x"}, "invalid device"),
        ({"uplink_floor_kbit": 200000}, "at most a tenth"),
        ({"uplink_mbit": 0, "uplink_device": "no-such-link0"}, "set uplink_mbit"),
    ],
)
def test_from_conf_names_what_is_wrong(over: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        uplinkwatch.from_conf(conf(**over), A, FakeTgt([]), ())


def test_link_rate_from_sysfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(uplink, "link_speed_mbit", lambda device: 1000)
    assert uplinkwatch.link_rate("eth0", 0) == 950
    assert uplinkwatch.link_rate("eth0", 400) == 400


def test_options_are_registered_and_off_by_default() -> None:
    import virtman.conf

    opts = {o.name: o for o in virtman.conf.default_opts if o.name.startswith("uplink_")}
    assert set(opts) == {"uplink_priority", "uplink_device", "uplink_mbit", "uplink_floor_kbit"}
    assert opts["uplink_priority"].default is False
    assert "off until measured" in opts["uplink_priority"].help.lower().replace("\n", " ")


def test_nbd_peers_come_from_proc() -> None:
    assert uplinkwatch.established_peers is proc.established_peers
