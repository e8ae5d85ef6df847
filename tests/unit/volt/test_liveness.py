"""The evictor credits the time volt-api's event loop was blocked, and suspends eviction
while it is."""

from __future__ import annotations

from pathlib import Path

from tests.unit.fakes.clock import Clock
from tests.unit.volt.rig import make
from volt.liveness import PROBE_INTERVAL, Evictor, LoadMonitor


def ticks(monitor: LoadMonitor, clock: Clock, seconds: float) -> None:
    """The probe running on time for ``seconds``."""
    for _ in range(round(seconds / PROBE_INTERVAL)):
        clock.now += PROBE_INTERVAL
        monitor.tick()


def test_monitor_measures_how_long_the_loop_was_blocked() -> None:
    clock = Clock()
    monitor = LoadMonitor(clock=clock)
    assert monitor.take() == (0.0, 0.0, False)
    clock.now += 100  # no probe has run yet (no loop): never "blocked"
    assert monitor.take() == (0.0, 100.0, False)
    monitor.tick()
    ticks(monitor, clock, 1.0)
    clock.now += 0.2  # late by 0.2 s - PROBE_INTERVAL: within the grace
    monitor.tick()
    clock.now += 3.1  # blocked 3 s
    monitor.tick()
    blocked, window, now = monitor.take()
    assert (round(blocked, 6), round(window, 6), now) == (3.0, 4.3, False)
    clock.now += 2.1  # blocked now, 2 s so far
    blocked, window, now = monitor.take()
    assert (round(blocked, 6), now) == (2.0, True)
    clock.now += 1.0  # the same block goes on: only the new second counts
    blocked, window, now = monitor.take()
    assert (round(blocked, 6), now) == (1.0, True)
    monitor.tick()  # the loop runs again
    assert monitor.take()[::2] == (0.0, False)


def test_a_blocked_loop_suspends_eviction_and_credits_every_host(tmp_path: Path) -> None:
    clock = Clock()
    service = make(tmp_path, clock=clock)  # node_timeout 60
    service.query("volume-a", "10.0.0.1")
    monitor = LoadMonitor(clock=clock)
    evictor = Evictor(service, monitor)
    monitor.tick()
    clock.now += 100  # the loop is stuck (a slow store, say) for 100 s
    assert evictor.scan() == []  # without the monitor: ["10.0.0.1"]
    monitor.tick()
    ticks(monitor, clock, 59)  # the host had its full node_timeout after the loop freed up
    assert evictor.scan() == []
    ticks(monitor, clock, 2)
    assert evictor.scan() == ["10.0.0.1"]


def test_a_short_block_is_credited_but_does_not_suspend(tmp_path: Path) -> None:
    clock = Clock()
    service = make(tmp_path, clock=clock)
    service.query("volume-a", "10.0.0.1")
    monitor = LoadMonitor(clock=clock)
    evictor = Evictor(service, monitor)
    monitor.tick()
    ticks(monitor, clock, 55)
    clock.now += 5.1  # blocked 5 s
    monitor.tick()
    ticks(monitor, clock, 1)
    assert evictor.scan() == []  # silent 61.1 s, minus the 5 s credit
    ticks(monitor, clock, 5)
    assert evictor.scan() == ["10.0.0.1"]
