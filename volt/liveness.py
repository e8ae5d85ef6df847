"""The eviction loop: hosts silent for ``node_timeout`` leave all their trees.

A host is only evicted for silence volt-api itself did not cause. The handlers run on
Granian's event loop; while it is blocked (a slow store, GC, a burst), heartbeats wait. A
probe on the loop measures how late it runs: each scan credits every host the time the loop
was blocked, and when it was blocked for at least half of the scan interval (or is blocked
now), the whole interval is credited and nobody is evicted.

On a shared store (several volt-api processes, docs/ha.rst) only the holder of the evictor
lease scans; the others try to take it every ``LEASE_INTERVAL``. A new holder first credits
every host so that nobody is evicted in the next ``takeover_grace`` seconds: their heartbeats
may have gone to the master that died, and they need time to fail over.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from volt.service import VoltService
from volt.store import EvictorLease

LOG = logging.getLogger(__name__)
BLOCKED_SHARE = 0.5  # of a scan interval: above it, the interval counts as not served
PROBE_INTERVAL = 0.1  # seconds between two probes on the event loop
LAG_GRACE = 0.25  # seconds: a probe later than this means the loop was blocked
LEASE_INTERVAL = 0.25  # seconds between two attempts to take the evictor lease


def scan_interval(node_timeout: float) -> float:
    """How often to look for silent hosts: a sixth of the timeout, between 0.5 s and 10 s."""
    return min(max(node_timeout / 6.0, 0.5), 10.0)


class LoadMonitor:
    """How long volt-api's event loop could not run (its probe fired late), per window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._beat: float | None = None  # last probe; None until the loop runs one
        self._blocked = 0.0  # seconds of finished blocks not yet taken
        self._counted = 0.0  # seconds of the block under way already taken
        self._window_start = clock()
        self._lock = threading.Lock()

    def tick(self) -> None:
        """One probe, on the event loop."""
        with self._lock:
            now = self.clock()
            if self._beat is not None:
                late = now - self._beat - PROBE_INTERVAL
                if late > LAG_GRACE:
                    self._blocked += max(0.0, late - self._counted)
            self._beat, self._counted = now, 0.0

    async def probe(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(PROBE_INTERVAL)

    def take(self) -> tuple[float, float, bool]:
        """(seconds the loop was blocked, seconds elapsed, whether it is blocked now) since
        the last call. A block under way counts up to now, and the rest next time."""
        with self._lock:
            now = self.clock()
            blocked, self._blocked = self._blocked, 0.0
            blocked_now = False
            if self._beat is not None:
                late = now - self._beat - PROBE_INTERVAL
                if late > LAG_GRACE:
                    blocked += late - self._counted
                    self._counted, blocked_now = late, True
            window, self._window_start = now - self._window_start, now
            return blocked, window, blocked_now


class Evictor(threading.Thread):
    def __init__(self, service: VoltService, monitor: LoadMonitor | None = None) -> None:
        super().__init__(name="volt-evictor", daemon=True)
        self.service = service
        self.monitor = monitor
        self.interval = scan_interval(service.node_timeout)
        self._stop_event = threading.Event()
        self.lease = EvictorLease(service.store) if service.store.shared else None
        # Shared store: seconds a new evictor waits before evicting anyone.
        self.takeover_grace = service.liveness_write_interval + 2 * self.interval
        self.leader_since: float | None = None  # monotonic time this process took the lease

    def run(self) -> None:
        if self.lease is not None:
            self._run_shared(self.lease)
            return
        while not self._stop_event.wait(self.interval):
            try:
                self.service.retry_unloaded()
                self.scan()
            except Exception:
                LOG.exception("eviction scan failed; retrying in %.1f s", self.interval)

    def _run_shared(self, lease: EvictorLease) -> None:
        next_scan = time.monotonic() + self.interval
        while not self._stop_event.wait(LEASE_INTERVAL):
            try:
                held = lease.hold()
                if held and self.leader_since is None:
                    self.leader_since = time.monotonic()
                    self.service.credit_takeover(self.takeover_grace)
                    if self.monitor is not None:
                        self.monitor.take()  # blocks before the takeover are not ours
                    LOG.warning(
                        "this volt-api is now the evictor (no eviction in the next %.1f s)",
                        self.takeover_grace,
                    )
                    next_scan = time.monotonic() + self.interval
                elif not held and self.leader_since is not None:
                    LOG.warning("this volt-api is no longer the evictor")
                    self.leader_since = None
                if held and time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self.interval
                    self.scan()
            except Exception:
                LOG.exception("eviction scan failed; retrying in %.1f s", self.interval)
        lease.release()

    def scan(self) -> list[str]:
        """One eviction pass; returns the evicted hosts."""
        if self.monitor is not None:
            blocked, window, blocked_now = self.monitor.take()
            if blocked_now or blocked >= BLOCKED_SHARE * window > 0:
                self.service.credit(window)
                LOG.warning(
                    "volt-api could not serve for %.1f of the last %.1f s%s: eviction "
                    "suspended, every host credited %.1f s",
                    blocked,
                    window,
                    " (still blocked)" if blocked_now else "",
                    window,
                )
                return []
            if blocked > 0:
                self.service.credit(blocked)
        return self.service.evict_expired()

    def stop(self) -> None:
        self._stop_event.set()
