"""Virtman and the control bus: a push from Volt takes the heartbeat's path at once, and
the stack's life is reported as notifications (the bus itself is faked here; the wire is
tested in tests/unit/volt/test_bus.py over ``fake:/``)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from brick import bus
from tests.unit.fakes.driver import FakeDriver
from tests.unit.fakes.settings import CONN, settings
from tests.unit.fakes.volt import FakeVolt, ready
from virtman.compute import Virtman

pytestmark = pytest.mark.unit


class FakeBus:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict, bool]] = []

    def event(self, event_type: str, payload: dict, *, error: bool = False) -> None:
        self.events.append((event_type, payload, error))

    def stop(self) -> None:
        pass


def make(tmp_path: Path, driver: FakeDriver | None = None):
    driver = driver or FakeDriver()
    volt = FakeVolt()
    vm = Virtman(settings=settings(tmp_path), driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    vm.bus = FakeBus()  # type: ignore[assignment]
    return vm, driver, volt


def test_a_push_switches_the_paths_at_once(tmp_path: Path) -> None:
    vm, driver, _ = make(tmp_path)
    assert vm.create("vm1", "img", CONN).startswith("0:")
    peer_id = vm.images["volume-img"].peer_id
    vm.apply_pushed({peer_id: [ready("10.0.0.3", "volume-img")], "other:peer": []})
    assert [e.peer_id for e in driver.state.upstreams["volume-img"]] == ["10.0.0.3:volume-img"]
    vm.apply_pushed({peer_id: []})  # back to the image server
    assert [e.portal for e in driver.state.upstreams["volume-img"]] == ["10.0.0.1:3260"]


def test_a_push_for_a_busy_image_wakes_the_heartbeat(tmp_path: Path) -> None:
    vm, _driver, _ = make(tmp_path)
    vm.create("vm1", "img", CONN)
    base = vm.images["volume-img"]
    vm._wake.clear()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with base.lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    vm.apply_pushed({base.peer_id: [ready("10.0.0.3", "volume-img")]})
    assert vm._wake.is_set()  # the heartbeat runs now and applies it
    release.set()
    holder.join()


def test_stack_events_are_notified(tmp_path: Path) -> None:
    vm, _, _ = make(tmp_path)
    vm.create("vm1", "img", CONN)
    built = [e for e in vm.bus.events if e[0] == bus.EVENT_STACK_BUILT]  # type: ignore[union-attr]
    assert len(built) == 1 and built[0][1]["image"] == "volume-img" and not built[0][2]


def test_a_failed_build_is_notified_as_an_error(tmp_path: Path) -> None:
    vm, _driver, _ = make(tmp_path, FakeDriver(fail={"cache"}))
    assert vm.create("vm1", "img", CONN).startswith("2:")
    failed = [e for e in vm.bus.events if e[0] == bus.EVENT_STACK_FAILED]  # type: ignore[union-attr]
    assert len(failed) == 1 and failed[0][2] and "error" in failed[0][1]


def test_no_transport_url_no_bus(tmp_path: Path) -> None:
    vm = Virtman(settings=settings(tmp_path), driver=FakeDriver(), volt=FakeVolt())  # type: ignore[arg-type]
    try:
        assert vm.bus is None
    finally:
        vm.close()


def test_transport_url_is_unset_by_default() -> None:
    """oslo.messaging's own default (rabbit://, a local broker) must not turn the bus on."""
    from oslo_config import cfg

    import virtman.conf

    assert cfg.CONF.transport_url is None
    assert virtman.conf.Settings.transport_url is None
