"""The evictor credits the time volt-api could not serve, and suspends eviction meanwhile."""

from __future__ import annotations

from pathlib import Path

from tests.unit.volt.test_service import Clock, make
from volt.liveness import Evictor, LoadMonitor


def test_monitor_measures_the_time_every_worker_was_busy() -> None:
    clock = Clock()
    monitor = LoadMonitor(2, clock=clock)
    monitor.enter()
    clock.now += 1.0
    monitor.enter()  # saturated from here
    clock.now += 2.0
    monitor.exit()
    clock.now += 1.0
    assert monitor.take() == (2.0, 4.0)
    monitor.enter()  # saturated again, still at the next take
    clock.now += 3.0
    assert monitor.take() == (3.0, 3.0)
    clock.now += 1.0
    monitor.exit()
    monitor.exit()
    assert monitor.take() == (1.0, 1.0)
    clock.now += 5.0
    assert monitor.take() == (0.0, 5.0)


def test_a_saturated_pool_suspends_eviction_and_credits_every_host(tmp_path: Path) -> None:
    clock = Clock()
    service = make(tmp_path, clock=clock)  # node_timeout 60
    service.query("volume-a", "10.0.0.1")
    monitor = LoadMonitor(1, clock=clock)
    evictor = Evictor(service, monitor)
    monitor.enter()  # the only worker is stuck (a slow store, say) for 100 s
    clock.now += 100
    assert evictor.scan() == []  # without the monitor: ["10.0.0.1"]
    monitor.exit()
    clock.now += 59  # the host had its full node_timeout after the pool freed up
    assert evictor.scan() == []
    clock.now += 2
    assert evictor.scan() == ["10.0.0.1"]


def test_brief_saturation_is_credited_but_does_not_suspend(tmp_path: Path) -> None:
    clock = Clock()
    service = make(tmp_path, clock=clock)
    service.query("volume-a", "10.0.0.1")
    monitor = LoadMonitor(1, clock=clock)
    evictor = Evictor(service, monitor)
    monitor.take()
    clock.now += 55
    monitor.enter()
    clock.now += 5  # saturated 5 of 61 s: credited, not a suspension
    monitor.exit()
    clock.now += 1
    assert evictor.scan() == []  # silent 61 s, minus the 5 s credit
    clock.now += 5
    assert evictor.scan() == ["10.0.0.1"]
