"""Keeps the node's daemons running: a daemon that dies is started again at once, and
what lived in it is rebuilt by the parts of virtman that own it.

``Driver.revive`` restarts the daemons and says what was lost (``Revived``); the listeners
(the image stacks of ``Virtman``, the image targets of ``ImageService``) rebuild it. Without
this a SIGKILLed qemu-storage-daemon or tgtd went unnoticed until virtmanserver restarted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from brick.periodic import Periodic
from virtman.layers.base import Driver, Revived

LOG = logging.getLogger(__name__)

Listener = Callable[[Revived], object]  # what it returns is not used


class Supervisor:
    def __init__(self, driver: Driver, interval_s: float) -> None:
        self.driver = driver
        self.listeners: list[Listener] = []
        self._rounds = Periodic("supervisor", interval_s, self._round, join_timeout_s=60)

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
        self._rounds.start()

    def stop(self) -> None:
        """Stop checking (before the daemons are stopped on purpose)."""
        self._rounds.stop()

    def _round(self) -> None:
        try:
            self.check()
        except Exception as exc:  # a failed start is retried next round
            LOG.error("a node daemon could not be started again: %s; retrying", exc)
