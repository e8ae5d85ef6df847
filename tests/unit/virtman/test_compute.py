"""Virtman's logic (results, undo, locking, heartbeat, reconcile) over in-memory layers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from brick.wait import wait_until
from tests.unit.fakes.driver import FakeDriver
from tests.unit.fakes.settings import CONN, settings
from tests.unit.fakes.volt import FakeVolt, ready
from virtman.compute import Virtman
from virtman.errors import ParentsUnavailable
from virtman.voltlink import VoltLink
from voltclient.client import Volume
from voltclient.exceptions import VoltClientError


def make(tmp_path: Path, driver: FakeDriver | None = None, volt: FakeVolt | None = None):
    driver = driver or FakeDriver()
    volt = volt or FakeVolt()
    return (
        Virtman(settings=settings(tmp_path), driver=driver, volt=volt, heartbeat=False),
        driver,
        volt,
    )  # type: ignore[arg-type]


def test_create_list_destroy_and_lazy_teardown(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    assert vm.create("vm1", "img", CONN) == "0:/fake/instances/vm1.qcow2"
    assert vm.list() == ["vm1:volume-img"]
    # one request places and registers the node (issue 15): no query before
    assert volt.calls == [("place_and_register", "volume-img", "10.0.0.9:volume-img",
                           "10.0.0.9:10809")]  # fmt: skip
    assert vm.destroy("vm1") == "0:"
    assert vm.list() == []
    assert driver.state.relays  # the relay stays until the heartbeat finds it unused
    vm.heartbeat()
    assert driver.empty()
    assert ("leave", "volume-img", "10.0.0.9:volume-img") in volt.calls


def test_drop_idle_image_tears_down_an_unused_stack_only(tmp_path: Path) -> None:
    """What the z/VM image_delete calls first: the node's own idle stack goes at once; its
    instances or other nodes reading its relay keep it, named, nothing torn down."""
    vm, driver, volt = make(tmp_path)
    assert vm.drop_idle_image("volume-img") is None  # no stack of it: nothing to do
    vm.create("vm1", "img", CONN)
    assert vm.drop_idle_image("volume-img") == "instances of this node on it: vm1"
    vm.destroy("vm1")
    driver.state.readers_of["volume-img"] = 2  # children in the tree
    why = vm.drop_idle_image("volume-img")
    assert why is not None and why.startswith("2 other node(s) read it through this node's relay")
    assert driver.state.relays and ("leave", "volume-img", "10.0.0.9:volume-img") not in volt.calls
    driver.state.readers_of["volume-img"] = 0
    assert vm.drop_idle_image("volume-img") is None  # no heartbeat needed
    assert driver.empty() and "volume-img" not in vm.images
    assert ("leave", "volume-img", "10.0.0.9:volume-img") in volt.calls


def test_original_warnings(tmp_path: Path) -> None:
    vm, _, _ = make(tmp_path)
    vm.create("vm1", "img", [CONN])
    assert vm.create("vm1", "img", CONN) == "1:Virtman: the instance_name 'vm1' already exists!"
    assert vm.destroy("nope") == "1:Virtman: the instance_name 'nope' does not exist!"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("vm;rm -rf /", "img", CONN), "instance_name"),
        (("../etc", "img", CONN), "instance_name"),
        (("vm1", "img/../x", CONN), "image_name"),
        (("vm1", "img", {**CONN, "target_portal": "10.0.0.1"}), "target_portal"),
        (("vm1", "img", {**CONN, "target_iqn": "not an iqn"}), "target_iqn"),
        (("vm1", "img", {**CONN, "target_lun": "x"}), "target_lun"),
        (("vm1", "img", []), "image_connection"),
        (("vm1", "img", CONN, "/dev/loop3"), "snapshot"),
    ],
)
def test_bad_input_is_a_failure_result_and_creates_nothing(tmp_path, args, field) -> None:
    vm, driver, volt = make(tmp_path)
    result = vm.create(*args)
    assert result.startswith(f"2:invalid {field} ")
    assert driver.empty() and vm.list() == [] and volt.calls == []


@pytest.mark.parametrize("layer", ["upstream", "cache", "relay", "snapshot"])
def test_a_failed_create_leaves_nothing_and_frees_the_name(tmp_path, layer) -> None:
    driver = FakeDriver(fail={layer})
    vm, driver, volt = make(tmp_path, driver)
    result = vm.create("vm1", "img", CONN)
    assert result.startswith("2:") and f"{layer} broke" in result
    vm.heartbeat()
    assert driver.empty() and vm.list() == []
    assert not driver.state.cache_files
    # a node is placed by its registration, the build's last step: only a failure after
    # it (the snapshot) has a place in Volt to leave
    placed = any(call[0] == "place_and_register" for call in volt.calls)
    assert placed == (layer == "snapshot")
    assert (("leave", "volume-img", "10.0.0.9:volume-img") in volt.calls) == placed
    driver.state.fail.clear()
    assert vm.create("vm1", "img", CONN).startswith("0:")


def test_concurrent_creates_of_one_image_build_it_once(tmp_path: Path) -> None:
    vm, driver, _ = make(tmp_path)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(vm.create(f"vm{i}", "img", CONN)))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(f"0:/fake/instances/vm{i}.qcow2" for i in range(8))
    assert driver.state.builds == 1


def test_creates_of_different_images_build_in_parallel(tmp_path: Path) -> None:
    vm, driver, _ = make(tmp_path)
    slow, building = threading.Event(), threading.Event()
    ensure = driver.upstream.ensure

    def upstream(spec):  # type: ignore[no-untyped-def]
        if spec.image == "volume-slow":
            building.set()
            assert slow.wait(10)
        return ensure(spec)

    driver.upstream.ensure = upstream  # type: ignore[method-assign]
    other = dict(CONN, target_iqn="iqn.2010-10.org.openstack:volume-slow")
    creator = threading.Thread(target=vm.create, args=("vm1", "slow", other))
    creator.start()
    assert building.wait(10)  # vm1's build now waits, holding its image's lock
    assert vm.create("vm2", "img", CONN).startswith("0:")
    assert creator.is_alive()  # vm2 was built while vm1's build still waited
    slow.set()
    creator.join()
    assert vm.list() == ["vm1:volume-slow", "vm2:volume-img"]


def test_heartbeat_never_waits_behind_a_build(tmp_path: Path) -> None:
    gate = threading.Event()
    vm, driver, _ = make(tmp_path, FakeDriver(gate=gate))
    creator = threading.Thread(target=vm.create, args=("vm1", "img", CONN))
    creator.start()
    assert driver.state.at_gate.wait(10)  # the build waits on the gate, holding the lock
    vm.heartbeat()
    assert creator.is_alive()  # the heartbeat ended while the build still waited
    gate.set()
    creator.join()
    assert vm.list() == ["vm1:volume-img"]


def test_heartbeat_follows_new_parents_in_order(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    assert [e.portal for e in driver.state.upstreams["volume-img"]] == ["10.0.0.1:3260"]
    volt.parents["volume-img"] = [
        ready("10.0.0.3", "volume-img"),
        ready("10.0.0.4", "volume-img", None),
    ]
    vm.heartbeat()
    paths = driver.state.upstreams["volume-img"]
    assert [(e.peer_id, e.nbd) for e in paths] == [
        ("10.0.0.3:volume-img", "10.0.0.3:10809"),
        ("10.0.0.4:volume-img", None),
    ]


def test_a_volt_that_cannot_place_on_register_gets_a_query_then_a_registration(
    tmp_path: Path,
) -> None:
    vm, driver, volt = make(tmp_path)
    volt.places = False  # a btree executor, or a Volt without the extension
    volt.registered_parents["volume-img"] = [ready("10.0.0.3", "volume-img")]
    assert vm.create("vm1", "img", CONN).startswith("0:")
    assert volt.calls == [
        ("not_placed", "volume-img"),
        ("join", "volume-img"),
        ("register", "volume-img", "10.0.0.9:volume-img", "10.0.0.9:10809"),
    ]
    assert [e.peer_id for e in driver.state.upstreams["volume-img"]] == ["10.0.0.3:volume-img"]


def test_a_node_volt_forgot_joins_again(tmp_path: Path) -> None:
    vm, _, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    volt.known.clear()  # evicted while away
    vm.heartbeat()
    # placed by its first registration; joined again by a query and a registration
    assert volt.calls.count(("join", "volume-img")) == 1
    assert (
        volt.calls.count(("register", "volume-img", "10.0.0.9:volume-img", "10.0.0.9:10809")) == 1
    )


def test_the_image_server_itself_reads_locally_and_does_not_relay(tmp_path: Path) -> None:
    driver, volt = FakeDriver(), FakeVolt(host_ip="10.0.0.1")
    vm = Virtman(settings=settings(tmp_path, "10.0.0.1"), driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    other = {**CONN, "target_portal": "10.0.0.11:3260"}
    assert vm.create("vm1", "img", [other, CONN]).startswith("0:")
    assert volt.calls == [] and not driver.state.relays
    assert [e.portal for e in driver.state.upstreams["volume-img"]] == ["10.0.0.1:3260"]


def test_restart_adopts_what_is_intact_and_removes_the_rest(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    vm.create("vm2", "img", CONN)
    # a create that never ended: journaled as creating, its disk made, no caller got it
    vm.journal.put("instances", "half", {"image": "volume-img", "creating": True})
    driver.state.snapshots["half"] = "/fake/instances/half.qcow2"
    driver.state.upstreams["volume-other"] = []  # a stack whose build was cut short
    vm.close()
    again = Virtman(settings=settings(tmp_path), driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    assert again.list() == ["vm1:volume-img", "vm2:volume-img"]
    assert sorted(driver.state.snapshots) == ["vm1", "vm2"]
    assert "half" not in again.journal.instances()
    assert driver.images() == {"volume-img"}
    assert again.destroy("vm1") == "0:" and again.destroy("vm2") == "0:"
    again.heartbeat()
    assert driver.empty()


def test_a_disk_without_a_journal_record_is_kept_and_never_replaced(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    driver.state.snapshots["lost"] = "user data"  # e.g. the journal was restored from a backup
    vm.close()
    again = Virtman(settings=settings(tmp_path), driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    assert again.list() == ["vm1:volume-img"]
    result = again.create("lost", "img", CONN)
    assert result.startswith("2:") and "already exists on this node" in result
    assert driver.state.snapshots["lost"] == "user data"
    assert again.list() == ["vm1:volume-img"]


def test_volt_down_at_restart_keeps_everything_degraded_then_heals(tmp_path: Path) -> None:
    """issue 10 finding 4: the restart while Volt is away used to drop the VMs' disks."""
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    vm.create("vm2", "img", CONN)
    vm.close()
    volt.down = True
    before = (dict(driver.state.snapshots), dict(driver.state.caches), dict(driver.state.relays))
    again = Virtman(settings=settings(tmp_path), driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    assert again.list() == ["vm1:volume-img:degraded", "vm2:volume-img:degraded"]
    after = (dict(driver.state.snapshots), dict(driver.state.caches), dict(driver.state.relays))
    assert after == before
    assert again.journal.images()["volume-img"]["status"] == "degraded"
    # creates still work on the running stack; the heartbeat (Volt down) tears nothing down
    assert again.create("vm3", "img", CONN) == "0:/fake/instances/vm3.qcow2"
    with pytest.raises(VoltClientError):
        again.heartbeat()
    assert sorted(driver.state.snapshots) == ["vm1", "vm2", "vm3"]
    base = again.images["volume-img"]
    assert base.heal() is False and base.retry.failures == 2
    volt.down = False
    assert base.heal() is True
    assert again.list() == ["vm1:volume-img", "vm2:volume-img", "vm3:volume-img"]
    assert again.journal.images()["volume-img"]["status"] == "ok"
    assert ("register", "volume-img", "10.0.0.9:volume-img", "10.0.0.9:10809") in volt.calls[-3:]
    assert base.retry.remaining() is None


def test_a_stack_that_cannot_be_rebuilt_keeps_its_vms_disks(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    vm.create("vm2", "img", CONN)
    vm.close()
    driver.state.caches.clear()  # the stack went away while virtman was down ...
    volt.down = True  # ... and Volt is away
    again = Virtman(settings=settings(tmp_path), driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    assert again.list() == ["vm1:volume-img:degraded", "vm2:volume-img:degraded"]
    assert sorted(driver.state.snapshots) == ["vm1", "vm2"]
    assert sorted(again.journal.instances()) == ["vm1", "vm2"]
    assert driver.state.cache_files == {"volume-img"}  # kept for the rebuild to reuse
    volt.down, driver.state.fail = False, {"relay"}  # a failure after the cache step
    assert again.images["volume-img"].heal() is False
    assert driver.state.cache_files == {"volume-img"} and not driver.state.caches
    volt.down, driver.state.fail = True, set()
    result = again.create("vm3", "img", CONN)
    assert result.startswith("2:") and "degraded" in result, result
    assert again.list() == ["vm1:volume-img:degraded", "vm2:volume-img:degraded"]
    assert again.destroy("vm2") == "0:"
    assert sorted(driver.state.snapshots) == ["vm1"]
    volt.down = False
    assert again.images["volume-img"].heal() is True
    assert again.list() == ["vm1:volume-img"]
    assert "volume-img" in driver.state.caches


def test_the_heartbeat_retries_a_degraded_image_in_the_background(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    vm.close()
    volt.down = True
    again = Virtman(settings=settings(tmp_path), driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    base = again.images["volume-img"]
    base.retry.next_at = 0.0  # due now
    volt.down = False
    again.heartbeat()
    wait_until(lambda: base.status == "ok", timeout_s=5, what="the background heal")
    assert again.list() == ["vm1:volume-img"]


def test_losing_volt_at_runtime_tears_nothing_down(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    volt.down = True
    for _ in range(3):
        with pytest.raises(VoltClientError):
            vm.heartbeat()
    assert vm.list() == ["vm1:volume-img"]
    assert driver.state.caches and driver.state.relays and driver.state.snapshots


def test_a_broken_stack_is_rebuilt_for_its_vms_at_restart(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    vm.close()
    driver.state.caches.clear()  # the cache went away while virtman was down
    again = Virtman(settings=settings(tmp_path), driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    assert again.list() == ["vm1:volume-img"]
    assert "volume-img" in driver.state.caches


def test_shutdown_without_vms_tears_everything_down(tmp_path: Path) -> None:
    vm, driver, _ = make(tmp_path)
    vm.create("vm1", "img", CONN)
    vm.destroy("vm1")
    driver.state.readers_of["volume-img"] = 1  # a child that never lets go
    clock = iter([0.0, 0.0, 1e9, 1e9])
    vm.shutdown(clock=lambda: next(clock))
    assert driver.empty() and driver.stopped == 1


def test_shutdown_with_vms_keeps_the_stacks(tmp_path: Path) -> None:
    vm, driver, _ = make(tmp_path)
    vm.create("vm1", "img", CONN)
    vm.shutdown()
    assert driver.state.caches and driver.stopped == 0


def test_a_left_image_waits_for_its_readers_only_for_the_grace_period(tmp_path: Path) -> None:
    """Two leaving nodes that read from each other's relays (paths frozen when they left)
    must not wait for each other forever: after the grace the relay goes, readers or not."""
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    base = vm.images["volume-img"]
    now = [100.0]
    base.clock = lambda: now[0]
    vm.destroy("vm1")
    driver.state.readers_of["volume-img"] = 2
    assert base.teardown_if_unused() is False  # leaves Volt, keeps the relay for its readers
    assert ("leave", "volume-img", "10.0.0.9:volume-img") in volt.calls and driver.state.relays
    now[0] += vm.reader_grace_s - 0.1
    assert base.teardown_if_unused() is False and driver.state.relays
    now[0] += 0.2
    assert base.teardown_if_unused() is True
    assert driver.empty() and driver.state.forced_relay_teardowns == 1


class WatchedEvent(threading.Event):
    """An Event that tells when someone waits on it, and for how long they mean to."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        self.waiting.set()
        return super().wait(timeout)


class GatedVolt(FakeVolt):
    """A FakeVolt whose first heartbeat waits for ``first`` to open."""

    def __init__(self) -> None:
        super().__init__()
        self.first = threading.Event()

    def heartbeat(
        self, bytes_read: list[dict[str, object]] | None = None
    ) -> dict[str, list[Volume]]:
        assert self.first.wait(10)
        return super().heartbeat(bytes_read)


def test_a_create_under_a_pending_parent_wakes_the_heartbeat(tmp_path: Path) -> None:
    """Without the wake-up, a node of a burst read from the image server until the end of
    the current heartbeat period (20 s by default), not until its parent was ready."""
    volt = GatedVolt()
    pending = Volume("10.0.0.7", None, None, None, "pending", "10.0.0.7:volume-img", None)
    volt.parents["volume-img"] = [pending]
    driver = FakeDriver()
    vm = Virtman(settings=settings(tmp_path), driver=driver, volt=volt)  # type: ignore[arg-type]
    try:
        # The loop's first round is held in Volt's heartbeat while its wake-up event is
        # swapped for one that reports the wait: the loop then goes to sleep on it.
        wake = vm._wake = WatchedEvent()
        volt.first.set()
        assert wake.waiting.wait(10)
        assert wake.timeouts == [3600] and volt.calls == [("heartbeat",)]
        assert vm.create("vm1", "img", CONN).startswith("0:")
        volt.parents["volume-img"] = [ready("10.0.0.7", "volume-img")]
        wait_until(
            lambda: driver.state.upstreams["volume-img"][0].peer_id,
            timeout_s=5,
            what="the parent followed",
        )
        assert volt.calls.count(("heartbeat",)) > 1
        assert driver.state.upstreams["volume-img"][0].peer_id == "10.0.0.7:volume-img"
    finally:
        vm.close()


def test_a_dead_storage_daemon_s_stacks_are_rebuilt_in_place(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    volt.parents["volume-img"] = [ready("10.0.0.2", "volume-img")]
    vm.create("vm1", "img", CONN)
    calls = len(volt.calls)
    driver.crash_daemon(stacks=True)
    assert vm.supervisor.check().stacks
    assert driver.state.caches["volume-img"].name == "volume-img-cache"
    assert driver.state.relays == {"volume-img": CONN["target_iqn"]}
    # the same paths as before, read from the parent, the cache file reused
    assert [e.peer_id for e in driver.state.upstreams["volume-img"]] == ["10.0.0.2:volume-img"]
    assert driver.state.cache_files == {"volume-img"}
    assert volt.calls[calls:] == []  # same place in the tree: Volt is not asked again
    assert vm.list() == ["vm1:volume-img"]
    assert vm.supervisor.check().stacks is False  # reported once


def test_a_stack_that_cannot_be_rebuilt_after_a_daemon_died_is_degraded(tmp_path: Path) -> None:
    vm, driver, _ = make(tmp_path)
    vm.create("vm1", "img", CONN)
    driver.crash_daemon(stacks=True)
    driver.state.fail = {"cache"}
    vm.supervisor.check()
    base = vm.images["volume-img"]
    assert vm.list() == ["vm1:volume-img:degraded"]
    assert base.origin is None and "cannot be rebuilt: cache broke" in (base.problem or "")
    assert driver.state.snapshots == {"vm1": "/fake/instances/vm1.qcow2"}  # the disk stays
    driver.state.fail = set()
    assert base.heal() is True
    assert vm.list() == ["vm1:volume-img"] and "volume-img" in driver.state.relays


def test_a_dead_tgtd_s_relays_are_exported_again(tmp_path: Path) -> None:
    vm, driver, _ = make(tmp_path)
    vm.create("vm1", "img", CONN)
    cache = driver.state.caches["volume-img"]
    driver.crash_daemon(targets=True)
    assert vm.supervisor.check().targets
    assert driver.state.relays == {"volume-img": CONN["target_iqn"]}
    assert driver.state.caches["volume-img"] is cache  # the stack was not touched


def test_one_failing_listener_does_not_stop_the_others(tmp_path: Path) -> None:
    vm, driver, _ = make(tmp_path)
    seen: list[object] = []

    def broken(_revived: object) -> None:
        raise RuntimeError("boom")

    vm.supervisor.listeners[:0] = [broken]
    vm.supervisor.listeners.append(seen.append)
    driver.crash_daemon(targets=True)
    revived = vm.supervisor.check()
    assert seen == [revived]


def test_the_supervisor_does_not_wait_behind_a_busy_image(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("virtman.baseimage.BUSY_WAIT_S", 0.1)
    vm, driver, _ = make(tmp_path)
    vm.create("vm1", "img", CONN)
    base = vm.images["volume-img"]
    held, release = threading.Event(), threading.Event()

    def build_waiting_for_volt() -> None:
        with base.lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=build_waiting_for_volt)
    holder.start()
    held.wait(5)
    driver.crash_daemon(stacks=True)
    t0 = time.monotonic()
    vm.supervisor.check()
    assert time.monotonic() - t0 < 2.0
    assert "volume-img" not in driver.state.caches  # not yet: the image is busy
    release.set()
    holder.join()
    wait_until(lambda: "volume-img" in driver.state.caches, timeout_s=5, what="the rebuild")
    assert "volume-img" in driver.state.caches and vm.list() == ["vm1:volume-img"]


def test_a_background_join_gives_up_at_once_when_volt_is_unreachable() -> None:
    link = VoltLink("http://127.0.0.1:9", None, "10.0.0.9", timeout=2)
    t0 = time.monotonic()
    with pytest.raises(ParentsUnavailable, match="Volt did not place volume-img: Volt unreachable"):
        link.join("volume-img", timeout_s=60, quiet=True)
    assert time.monotonic() - t0 < 5


def test_the_register_answer_s_parents_are_followed_at_once(tmp_path: Path) -> None:
    """Issue 15: placed under a pending parent, the node builds its stack on the image
    server; registering lifts it above that parent and Volt answers the ready one: the node
    switches at once, without following (no fast heartbeats) and without a heartbeat."""
    vm, driver, volt = make(tmp_path)
    pending = Volume("10.0.0.7", None, None, None, "pending", "10.0.0.7:volume-img", None)
    volt.parents["volume-img"] = [pending]
    volt.registered_parents["volume-img"] = [ready("10.0.0.3", "volume-img")]
    assert vm.create("vm1", "img", CONN).startswith("0:")
    assert [e.peer_id for e in driver.state.upstreams["volume-img"]] == ["10.0.0.3:volume-img"]
    assert vm.images["volume-img"].following is False
    assert ("heartbeat",) not in volt.calls


def test_a_register_answer_without_parents_keeps_the_built_paths(tmp_path: Path) -> None:
    """An original volt-api answers no parents: the node keeps what it built from the
    query's answer and follows by heartbeat, as before."""
    vm, driver, volt = make(tmp_path)
    pending = Volume("10.0.0.7", None, None, None, "pending", "10.0.0.7:volume-img", None)
    volt.parents["volume-img"] = [pending]
    assert vm.create("vm1", "img", CONN).startswith("0:")
    assert [e.portal for e in driver.state.upstreams["volume-img"]] == [CONN["target_portal"]]
    assert vm.images["volume-img"].following is True


def test_the_heartbeat_carries_the_bytes_read_per_source(tmp_path: Path) -> None:
    vm, driver, volt = make(tmp_path)
    vm.create("vm1", "img", CONN)
    (server,) = driver.state.upstreams["volume-img"]
    driver.state.read_counts[server] = 7 << 20
    vm.heartbeat()
    assert volt.bytes_read == [{"peer_id": "10.0.0.9:volume-img", "source": None,
                                "bytes": 7 << 20}]  # fmt: skip
    volt.parents["volume-img"] = [ready("10.0.0.3", "volume-img")]
    vm.heartbeat()  # follows its parent: the image server's path is gone
    (parent,) = driver.state.upstreams["volume-img"]
    driver.state.read_counts[parent] = 3 << 20
    vm.heartbeat()
    assert volt.bytes_read == [{"peer_id": "10.0.0.9:volume-img", "source": "10.0.0.3:volume-img",
                                "bytes": 3 << 20}]  # fmt: skip
