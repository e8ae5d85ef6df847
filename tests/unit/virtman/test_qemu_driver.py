"""QemuDriver against a fake QMP (tests/unit/fakes/qmp.py): which commands it sends, in
which order, to create an image's stack, to adopt it again, to tear it down, and what a
failure half-way undoes (the fixtures: conftest.py). (The real daemon: the functional
tests.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from brick.exception import PathsUnavailable
from brick.qsd.qmp import QMPError
from tests.unit.fakes.qmp import FakeQMP, stand_in
from tests.unit.fakes.settings import settings as make_settings
from tests.unit.fakes.tgt import FakeTgt
from virtman.drivers.qemu.driver import QemuDriver
from virtman.layers.base import CacheSpec, Device, Endpoint, RelaySpec, UpstreamSpec
from virtman.stack import ImageStack

pytestmark = pytest.mark.unit

IMAGE = "volume-img"
IQN = "iqn.2010-10.org.openstack:volume-img"
ISCSI = Endpoint("10.0.0.1:3260", IQN, 1)
NBD = Endpoint("10.0.0.2:3260", IQN, 1, nbd="10.0.0.2:10809", peer_id="10.0.0.2:x")


@pytest.fixture
def driver(qemu_driver: QemuDriver) -> QemuDriver:
    return qemu_driver


def names(driver: QemuDriver) -> tuple[str, str, str, str, str, str, str]:
    n = driver.names(IMAGE)
    return n.path(ISCSI), n.path(NBD), n.quorum, n.cache, n.cor, n.fuse_export, n.nbd_export


def build(driver: QemuDriver) -> None:
    ImageStack(driver, IMAGE, iqn=IQN).build([NBD, ISCSI])


def test_create_sends_the_layers_bottom_up(driver: QemuDriver, qmp: FakeQMP) -> None:
    iscsi, nbd, quorum, cache, cor, fuse, nbd_export = names(driver)
    build(driver)
    assert qmp.changes() == [
        ("blockdev-add", nbd),  # the paths in the order given: NBD (a parent) first
        ("blockdev-add", iscsi),
        ("blockdev-add", quorum),
        ("blockdev-add", cache),
        ("blockdev-add", cor),
        ("block-export-add", fuse),
        ("block-export-add", nbd_export),
    ]
    sent = dict((c, a) for c, a in qmp.sent if c == "blockdev-add" and a["driver"] == "quorum")
    assert sent["blockdev-add"]["children"] == [nbd, iscsi]
    assert sent["blockdev-add"]["read-pattern"] == "fifo"
    assert qmp.nodes[cor].children == {"file": cache}
    assert qmp.exports[fuse]["node"] == cor and qmp.exports[nbd_export]["node"] == cor
    assert driver.origin(IMAGE) is not None
    assert driver.upstream.endpoints(IMAGE) == [NBD, ISCSI]


def test_adopt_sends_no_change(driver: QemuDriver, qmp: FakeQMP) -> None:
    build(driver)
    qmp.clear()
    build(driver)  # a restarted virtman builds the same stack: everything is adopted
    assert qmp.changes() == []
    assert "query-named-block-nodes" in qmp.commands(queries=True)


def test_a_new_path_order_is_switched_add_first(driver: QemuDriver, qmp: FakeQMP) -> None:
    iscsi, nbd, quorum, *_ = names(driver)
    build(driver)
    qmp.clear()
    driver.upstream.ensure(UpstreamSpec(IMAGE, (ISCSI, NBD)))
    # add before drop, so that the quorum always has a path
    assert [c for c, _ in qmp.changes()] == ["x-blockdev-change"] * 2
    assert [a.get("child") for c, a in qmp.sent if c == "x-blockdev-change"] == [
        "children.0",
        None,
    ]
    assert list(qmp.nodes[quorum].children.values()) == [iscsi, nbd]


def test_teardown_goes_top_down_and_leaves_nothing(driver: QemuDriver, qmp: FakeQMP) -> None:
    iscsi, nbd, quorum, cache, cor, fuse, nbd_export = names(driver)
    build(driver)
    qmp.clear()
    ImageStack(driver, IMAGE, iqn=IQN).teardown()
    changes = qmp.changes()
    assert changes[:5] == [
        ("block-export-del", nbd_export),  # the relay
        ("block-export-del", fuse),  # the cache
        ("blockdev-del", cor),
        ("blockdev-del", cache),
        ("blockdev-del", quorum),  # the upstream: the quorum, then its paths
    ]
    assert sorted(changes[5:]) == sorted([("blockdev-del", iscsi), ("blockdev-del", nbd)])
    assert qmp.nodes == {} and qmp.exports == {}
    assert not driver.names(IMAGE).cache_file.exists()
    qmp.clear()
    ImageStack(driver, IMAGE, iqn=IQN).teardown()  # idempotent: nothing left to send
    assert qmp.changes() == []


def test_a_failure_half_way_undoes_what_was_built(driver: QemuDriver, qmp: FakeQMP) -> None:
    *_, cor, fuse, _nbd_export = names(driver)
    qmp.fail("block-export-add", lambda a: a["type"] == "fuse", desc="fuse: mount failed")
    with pytest.raises(QMPError, match="fuse: mount failed"):
        build(driver)
    changes = qmp.changes()
    failed_at = changes.index(("block-export-add", fuse))
    assert [c for c, _ in changes[:failed_at]] == ["blockdev-add"] * 5
    # the layers undone top first: the cache's nodes, then the upstream's
    undone = changes[failed_at + 1 :]
    assert undone[0] == ("blockdev-del", cor)
    assert {c for c, _ in undone} == {"blockdev-del"} and len(undone) == 5
    assert qmp.nodes == {} and qmp.exports == {}
    assert driver.origin(IMAGE) is None and driver.upstream.endpoints(IMAGE) == []


def test_an_unusable_path_is_skipped_and_all_unusable_is_an_error(
    driver: QemuDriver, qmp: FakeQMP
) -> None:
    iscsi, _, quorum, *_ = names(driver)
    qmp.fail("blockdev-add", lambda a: a["driver"] == "nbd", desc="connection refused")
    driver.upstream.ensure(UpstreamSpec(IMAGE, (NBD, ISCSI)))
    assert qmp.nodes[quorum].children == {"children.0": iscsi}
    assert driver.upstream.endpoints(IMAGE) == [ISCSI]
    driver.upstream.teardown(IMAGE)
    qmp.fail("blockdev-add", lambda a: a["driver"] == "iscsi", desc="no route")
    with pytest.raises(PathsUnavailable):
        driver.upstream.ensure(UpstreamSpec(IMAGE, (ISCSI,)))
    assert quorum not in qmp.nodes


def test_an_ipv6_host_is_bracketed_in_its_portals(
    tmp_path: Path, qmp: FakeQMP, qemu_img: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in stand_in(tmp_path / "bin", qmp.path).items():
        monkeypatch.setenv(key, value)
    conf = dataclasses.replace(make_settings(tmp_path / "v6", "fd00::9"), qemu_fuse_readahead_kib=0)
    driver = QemuDriver(conf)
    assert driver.tgtd.portals == ["[fd00::9]:3260"]
    driver.qsd.start(timeout_s=10)
    try:
        driver.qsd.start_nbd_server(driver.host, conf.nbd_port)
        assert driver.qsd.nbd_server == "[fd00::9]:10809"
        origin = driver.cache.ensure(CacheSpec(IMAGE, _upstream(driver)))
        relay = driver.relay.ensure(RelaySpec(IMAGE, IQN, origin))
        assert (relay.portal, relay.nbd) == ("[fd00::9]:3260", "[fd00::9]:10809")
    finally:
        driver.qsd.stop()


def _upstream(driver: QemuDriver) -> Device:
    driver.tgt = FakeTgt()  # type: ignore[assignment]
    return driver.upstream.ensure(UpstreamSpec(IMAGE, (ISCSI,)))


def test_read_counters_are_each_paths_tcp_bytes_unless_its_peer_is_shared(
    driver: QemuDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(driver)  # NBD (10.0.0.2:10809) then iSCSI (10.0.0.1:3260)
    monkeypatch.setattr(type(driver.qsd), "pid", property(lambda self: 4242))
    asked = []

    def received(pid: int) -> dict[tuple[str, int], list[int]]:
        asked.append(pid)
        return {("10.0.0.2", 10809): [1000, 24], ("10.0.0.1", 3260): [5], ("10.0.0.7", 1): [9]}

    monkeypatch.setattr("virtman.drivers.qemu.driver.tcpinfo.received", received)
    assert driver.upstream.read_counters(IMAGE) == {NBD: 1024, ISCSI: 5}
    assert asked == [4242]
    # A second image read from the same image server portal: its sockets and this image's
    # cannot be told apart, so neither is counted; the NBD path still is.
    other = Endpoint("10.0.0.1:3260", "iqn.2010-10.org.openstack:volume-two", 1)
    ImageStack(driver, "volume-two", iqn=other.iqn).build([other])
    assert driver.upstream.read_counters(IMAGE) == {NBD: 1024}
    assert driver.upstream.read_counters("volume-two") == {}


def test_a_heartbeat_runs_ss_once_for_all_its_images(
    driver: QemuDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(driver)
    monkeypatch.setattr(type(driver.qsd), "pid", property(lambda self: 4242))
    asked = []
    monkeypatch.setattr(
        "virtman.drivers.qemu.driver.tcpinfo.received", lambda pid: asked.append(pid) or {}
    )
    clock = iter([100.0, 100.4, 100.9, 101.0, 101.5])
    monkeypatch.setattr("virtman.drivers.qemu.driver._clock", lambda: next(clock))
    for _ in range(5):
        driver.upstream.read_counters(IMAGE)
    assert asked == [4242, 4242]  # at 100.0 s and at 101.0 s (SOCKETS_TTL_S later)
