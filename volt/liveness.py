"""The eviction loop: hosts silent for ``node_timeout`` leave all their trees.

A silent host is only evicted for silence volt-api itself did not cause: while every worker
thread is busy for longer than ``SATURATION_GRACE`` (stalled clients, a burst), heartbeats
wait in Granian's queue, so that time is credited to every host and the scan that sees the
pool still saturated evicts nobody.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from volt.service import VoltService

LOG = logging.getLogger(__name__)
SATURATION_GRACE = 0.5  # seconds: a healthy busy pool is saturated for milliseconds


def scan_interval(node_timeout: float) -> float:
    """How often to look for silent hosts: a sixth of the timeout, between 0.5 s and 10 s."""
    return min(max(node_timeout / 6.0, 0.5), 10.0)


class LoadMonitor:
    """Counts requests in flight against the worker threads, and the time all were busy."""

    def __init__(self, threads: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.threads = threads
        self.clock = clock
        self.in_flight = 0
        self._saturated_since: float | None = None
        self._blocked = 0.0  # seconds beyond the grace, of episodes not yet taken
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            if self.in_flight >= self.threads and self._saturated_since is None:
                self._saturated_since = self.clock()

    def exit(self) -> None:
        with self._lock:
            self.in_flight -= 1
            if self.in_flight < self.threads and self._saturated_since is not None:
                self._blocked += max(0.0, self.clock() - self._saturated_since - SATURATION_GRACE)
                self._saturated_since = None

    def take_blocked(self) -> tuple[float, bool]:
        """(seconds the pool could not serve since the last call, saturated now past the
        grace). An episode still running is counted up to now and continues from there."""
        with self._lock:
            blocked, self._blocked = self._blocked, 0.0
            since = self._saturated_since
            if since is None:
                return blocked, False
            now = self.clock()
            ongoing = now - since - SATURATION_GRACE
            if ongoing <= 0:
                return blocked, False
            self._saturated_since = now - SATURATION_GRACE  # the rest counts next time
            return blocked + ongoing, True


class Evictor(threading.Thread):
    def __init__(self, service: VoltService, monitor: LoadMonitor | None = None) -> None:
        super().__init__(name="volt-evictor", daemon=True)
        self.service = service
        self.monitor = monitor
        self.interval = scan_interval(service.node_timeout)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.service.retry_unloaded()
                self.scan()
            except Exception:
                LOG.exception("eviction scan failed; retrying in %.1f s", self.interval)

    def scan(self) -> list[str]:
        """One eviction pass; returns the evicted hosts."""
        if self.monitor is not None:
            blocked, saturated = self.monitor.take_blocked()
            if blocked > 0:
                self.service.credit(blocked)
                LOG.warning(
                    "volt-api could not serve for %.1f s (all %d worker threads busy): "
                    "every host is credited that time%s",
                    blocked,
                    self.monitor.threads,
                    "; eviction suspended while it lasts" if saturated else "",
                )
            if saturated:
                return []
        return self.service.evict_expired()

    def stop(self) -> None:
        self._stop_event.set()
