"""Keeps the node's daemons running: a daemon that dies is started again at once, and
what lived in it is rebuilt by the parts of virtman that own it.

``Driver.revive`` restarts the daemons and says what was lost (``Revived``); the listeners
(the image stacks of ``Virtman``, the image targets of ``ImageService``) rebuild it. Without
this a SIGKILLed qemu-storage-daemon or tgtd went unnoticed until virtmanserver restarted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from virtman.layers.base import Driver, Revived

LOG = logging.getLogger(__name__)

Listener = Callable[[Revived], object]  # what it returns is not used


class Supervisor:
    def __init__(self, driver: Driver, interval_s: float) -> None:
        self.driver = driver
        self.interval_s = interval_s
        self.listeners: list[Listener] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> Revived:
        """One round: restart what died, then let every listener rebuild what it lost
        (one listener's failure does not stop the others)."""
        revived = self.driver.revive()
        if revived:
            for listener in self.listeners:
                try:
                    listener(revived)
                except Exception:
                    LOG.exception("rebuilding after a daemon restart failed")
        return revived

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop checking (before the daemons are stopped on purpose)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # a failed start is retried next round
                LOG.error("a node daemon could not be started again: %s; retrying", exc)
