"""The eviction loop: hosts silent for ``node_timeout`` leave all their trees.

A host is only evicted for silence volt-api itself did not cause. While every worker thread
is busy (a slow store, a burst, GIL starvation), heartbeats wait in the pool's queue: each
scan credits every host the time the pool was saturated, and when it was saturated for at
least half of the scan interval, the whole interval is credited and nobody is evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from volt.service import VoltService

LOG = logging.getLogger(__name__)
SATURATED_SHARE = 0.5  # of a scan interval: above it, the interval counts as not served


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
        self._saturated = 0.0  # seconds of finished saturation not yet taken
        self._window_start = clock()
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
                self._saturated += self.clock() - self._saturated_since
                self._saturated_since = None

    def take(self) -> tuple[float, float]:
        """(seconds every worker was busy, seconds elapsed) since the last call."""
        with self._lock:
            now = self.clock()
            saturated, self._saturated = self._saturated, 0.0
            if self._saturated_since is not None:
                saturated += now - self._saturated_since
                self._saturated_since = now
            window, self._window_start = now - self._window_start, now
            return saturated, window


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
            saturated, window = self.monitor.take()
            if saturated >= SATURATED_SHARE * window > 0:
                self.service.credit(window)
                LOG.warning(
                    "volt-api could not serve: all %d worker threads were busy for %.1f of the "
                    "last %.1f s; eviction suspended, every host credited %.1f s",
                    self.monitor.threads,
                    saturated,
                    window,
                    window,
                )
                return []
            if saturated > 0:
                self.service.credit(saturated)
        return self.service.evict_expired()

    def stop(self) -> None:
        self._stop_event.set()
