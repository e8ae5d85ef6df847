"""A node notices that a parent stopped serving it (virtman/parentwatch.py): the TCP check
of the first path, the drivers' failed reads (dm: ``dmsetup status``; qemu: the quorum's
events), one report per death, and the way the report travels (bus, else REST)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brick import bus
from brick.dm.parse import parse_status
from tests.unit.fakes.clock import Clock
from tests.unit.fakes.settings import CONN
from tests.unit.virtman.test_bus import make
from virtman.drivers.dm.driver import failed_endpoints
from virtman.layers.base import Endpoint
from virtman.parentwatch import ParentWatch, Watched, address

pytestmark = pytest.mark.unit

IMG = "volume-img"
P1 = Endpoint("10.0.0.1:3260", "iqn.x:img", 1, "10.0.0.1:10809", f"10.0.0.1:{IMG}")
P2 = Endpoint("10.0.0.2:3260", "iqn.x:img", 1, None, f"10.0.0.2:{IMG}")
SERVER = Endpoint("10.0.0.5:3260", "iqn.x:img", 1)  # an image server: never reported


class Rig:
    def __init__(self, paths: tuple[Endpoint, ...]) -> None:
        self.paths = paths
        self.dead: set[tuple[str, int]] = set()
        self.failed: list[Endpoint] = []
        self.probed: list[tuple[str, int]] = []
        self.reports: list[tuple[str, str, str]] = []
        self.clock = Clock()
        self.watch = ParentWatch(
            lambda: [Watched(IMG, f"10.0.0.9:{IMG}", self.paths)],
            lambda image: self.failed,
            lambda *r: self.reports.append(r),
            probe=self.probe,
            clock=self.clock,
        )

    def probe(self, host: str, port: int, timeout_s: float) -> bool:
        self.probed.append((host, port))
        return (host, port) not in self.dead


def test_the_first_path_is_probed_where_it_reads_and_a_death_reported_once():
    rig = Rig((P1, P2))
    assert rig.watch.check() == [] and rig.probed == [("10.0.0.1", 10809)]  # NBD first
    rig.dead.add(("10.0.0.1", 10809))
    assert rig.watch.check() == [(IMG, P1.peer_id)]
    assert rig.reports == [(IMG, f"10.0.0.9:{IMG}", P1.peer_id, 0)]
    rig.clock.now += 0.5
    assert rig.watch.check() == []  # reported already: not again at once
    rig.clock.now += 0.5
    assert rig.watch.check() == [(IMG, P1.peer_id)]  # still its parent 1 s later: again
    rig.clock.now += 4
    assert rig.watch.check() == []  # then every 5 s
    rig.clock.now += 1
    assert rig.watch.check() == [(IMG, P1.peer_id)]
    assert [r[3] for r in rig.reports] == [0, 1, 2]  # the attempts: the first may use the bus


def test_a_parent_that_left_the_paths_is_forgotten():
    rig = Rig((P1, P2))
    rig.dead.add(("10.0.0.1", 10809))
    rig.watch.check()
    rig.paths = (P2,)  # Volt's new parents are in place
    assert rig.watch.check() == [] and rig.watch.reported == {}
    rig.paths = (P1, P2)  # the same parent again later, dead again: reported at once
    assert rig.watch.check() == [(IMG, P1.peer_id)]


def test_failed_reads_report_any_parent_but_never_an_image_server():
    rig = Rig((P1, P2))
    rig.failed = [P2, SERVER]
    assert rig.watch.check() == [(IMG, P2.peer_id)]
    rig2 = Rig((SERVER,))
    rig2.dead.add(("10.0.0.5", 3260))
    assert rig2.watch.check() == [] and rig2.probed == []  # nothing to probe or report


def test_a_failing_report_is_logged_and_the_watch_goes_on():
    rig = Rig((P1,))
    rig.dead.add(("10.0.0.1", 10809))

    def broken(*report: str) -> None:
        raise OSError("Volt unreachable")

    rig.watch.report = broken
    assert rig.watch.check() == [(IMG, P1.peer_id)]


def test_address_prefers_the_nbd_export():
    assert address(P1) == ("10.0.0.1", 10809)
    assert address(P2) == ("10.0.0.2", 3260)


# -- dm: failed multipath paths --------------------------------------------------------------
def dm_status(text: str):
    (status,) = parse_status(text)
    return status


def test_dm_failed_groups_name_their_endpoints():
    # one group per path (FailoverMultipath), queue-length: the first path failed
    first_failed = "0 32768 multipath 2 0 0 0 2 2 E 0 1 1 8:0 F 1 0 A 0 1 1 8:16 A 0 0\n"
    assert failed_endpoints(dm_status(first_failed), [P1, P2]) == [P1]
    both = "0 32768 multipath 2 1 0 0 2 1 E 0 1 1 8:0 F 2 0 E 0 1 1 8:16 F 1 0\n"
    assert failed_endpoints(dm_status(both), [P1, P2]) == [P1, P2]
    healthy = "0 32768 multipath 2 0 0 0 2 1 A 0 1 1 8:0 A 0 0 E 0 1 1 8:16 A 0 0\n"
    assert failed_endpoints(dm_status(healthy), [P1, P2]) == []
    # a table that does not match the recorded paths (a reload under way) tells nothing
    assert failed_endpoints(dm_status(first_failed), [P1]) == []


# -- how the report travels ------------------------------------------------------------------
class UpBus:
    def __init__(self, up: bool) -> None:
        self.up = up
        self.events: list[tuple[str, dict, bool]] = []
        self.fallback = None

    def event(self, event_type: str, payload: dict, *, error: bool = False, fallback=None):
        self.events.append((event_type, payload, error))
        self.fallback = fallback

    def stop(self) -> None:
        pass


def test_a_report_goes_over_the_bus_when_it_is_up_else_over_rest(tmp_path: Path) -> None:
    vm, _driver, volt = make(tmp_path)
    assert vm.create("vm1", "img", CONN).startswith("0:")
    up = UpBus(True)
    vm.bus = up  # type: ignore[assignment]
    vm._report_dead_parent(IMG, "10.0.0.9:volume-img", P1.peer_id or "", 0)
    (event,) = up.events
    assert event[0] == bus.EVENT_PARENT_DEAD and event[2] is True
    assert event[1] == {"image": IMG, "peer_id": "10.0.0.9:volume-img", "parent": P1.peer_id}
    assert not [c for c in volt.calls if c[0] == "report_dead_parent"]
    up.fallback()  # the bus refused it: the REST API takes it
    assert ("report_dead_parent", IMG, "10.0.0.9:volume-img", P1.peer_id) in volt.calls
    volt.calls.clear()
    vm._report_dead_parent(IMG, "10.0.0.9:volume-img", P1.peer_id or "", 1)  # a second one
    assert len(up.events) == 1 and volt.calls[-1][0] == "report_dead_parent"  # over REST

    down = UpBus(False)
    vm.bus = down  # type: ignore[assignment]
    volt.calls.clear()
    vm._report_dead_parent(IMG, "10.0.0.9:volume-img", P1.peer_id or "", 0)
    assert down.events == [] and volt.calls[-1][0] == "report_dead_parent"
    # no push will come: the heartbeat asks for the new parents now, then every second
    assert vm._wake.is_set() and vm._next_round_s() == 1.0
    volt.down = True  # Volt unreachable too: logged, nothing raised (node_timeout remains)
    vm._report_dead_parent(IMG, "10.0.0.9:volume-img", P1.peer_id or "", 0)


def test_the_watch_sees_only_images_read_from_parents(tmp_path: Path) -> None:
    vm, _driver, _volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    (watched,) = vm._watched()
    base = vm.images[IMG]
    assert watched == Watched(IMG, base.peer_id, tuple(base.upstream))


# -- qemu: the quorum's reports of failed reads ----------------------------------------------
def test_qemu_quorum_reports_name_the_failed_path_once(qemu_driver) -> None:
    from virtman.stack import ImageStack

    ImageStack(qemu_driver, IMG, iqn="iqn.x:img").build([P1])
    n = qemu_driver.names(IMG)
    qmp = qemu_driver.qsd.qmp
    assert qemu_driver.upstream.failed_paths(IMG) == []
    for node in (n.path(P1), n.path(P2)):  # ours, and a path no image has (forgotten)
        qmp._dispatch({"event": "QUORUM_REPORT_BAD", "data": {"node-name": node, "type": "read"}})
    assert qemu_driver.upstream.failed_paths(IMG) == [P1]
    assert qemu_driver.upstream.failed_paths(IMG) == []  # taken: reported once
    assert qemu_driver.upstream._bad == set()
