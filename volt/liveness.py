"""The eviction loop: hosts silent for ``node_timeout`` leave all their trees."""

from __future__ import annotations

import logging
import threading

from volt.service import VoltService

LOG = logging.getLogger(__name__)


def scan_interval(node_timeout: float) -> float:
    """How often to look for silent hosts: a sixth of the timeout, between 0.5 s and 10 s."""
    return min(max(node_timeout / 6.0, 0.5), 10.0)


class Evictor(threading.Thread):
    def __init__(self, service: VoltService) -> None:
        super().__init__(name="volt-evictor", daemon=True)
        self.service = service
        self.interval = scan_interval(service.node_timeout)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.service.retry_unloaded()
                self.service.evict_expired()
            except Exception:
                LOG.exception("eviction scan failed; retrying in %.1f s", self.interval)

    def stop(self) -> None:
        self._stop_event.set()
