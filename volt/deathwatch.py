"""A child's report that its parent stopped serving it: confirm, then evict at once
(docs/bus.rst, "Detecting a dead parent").

A report names (image, the child's peer id, the parent's peer id) and arrives over the bus
(a ``vmthunder.parent.dead`` notification) or the REST API. One child's word never evicts a
live node: Volt connects to the port the child reads the parent from (TCP, ``timeout_s``)
and evicts the parent's host, exactly as the evictor does, only when that connect is
refused or unanswered; the eviction pushes the new parents to every affected child.

The check runs in this module's thread, never in volt-api's event loop. Reports of a host
whose check is queued or under way are folded into it, a host found alive is not checked
again for ``alive_hold_s``, and a parent evicted already is found gone: many children
reporting the same death make one check and one eviction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from brick.net import accepts

if TYPE_CHECKING:
    from volt.service import VoltService

LOG = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 0.5
ALIVE_HOLD_S = 2.0
QUEUE_SIZE = 1000

Probe = Callable[[str, int, float], bool]  # (host, port, timeout) -> accepts connections


@dataclass(frozen=True)
class Report:
    volume_id: str
    reporter: str  # the child's peer id
    parent: str  # the parent's peer id
    source: str  # "bus" or "api", for the log


class DeathWatch:
    def __init__(
        self,
        service: VoltService,
        *,
        probe: Probe = accepts,
        timeout_s: float = CONFIRM_TIMEOUT_S,
        alive_hold_s: float = ALIVE_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.probe = probe
        self.timeout_s = timeout_s
        self.alive_hold_s = alive_hold_s
        self.clock = clock
        self.counts: Counter[str] = Counter()  # checking, folded, gone, alive, evicted
        self._pending: set[str] = set()  # hosts whose check is queued or running
        self._alive: dict[str, float] = {}  # host -> when a check found it serving
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, str, int, Report] | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None

    def report(self, report: Report) -> str:
        """Take one report; returns what became of it: ``checking`` (a check is queued or
        under way), ``alive`` (found serving in the last ``alive_hold_s``), ``gone`` (the
        parent left the tree already). Raises VoltError for a report that is not the
        reporter's to make (see ``VoltService.dead_parent_target``); nothing changes."""
        target = self.service.dead_parent_target(report.volume_id, report.reporter, report.parent)
        if target is None:
            self._count("gone")
            LOG.info(
                "%s reports parent %s of %s dead (%s): not in the tree any more",
                report.reporter,
                report.parent,
                report.volume_id,
                report.source,
            )
            return "gone"
        member, host, port = target
        with self._lock:
            if member in self._pending:
                self.counts["folded"] += 1
                return "checking"
            seen = self._alive.get(member)
            if seen is not None and self.clock() - seen < self.alive_hold_s:
                self.counts["alive"] += 1
                return "alive"
            LOG.info(
                "%s reports that parent %s of %s stopped serving it (%s): checking %s:%d",
                report.reporter,
                report.parent,
                report.volume_id,
                report.source,
                host,
                port,
            )
            try:
                self._queue.put_nowait((member, host, port, report))
            except queue.Full:
                LOG.warning("dead parent reports: queue full, %s's report dropped", report.reporter)
                return "checking"
            self._pending.add(member)
            self.counts["checking"] += 1
            self._start()
        return "checking"

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _start(self) -> None:
        """The checking thread, at the first report (under the lock)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="volt-deathwatch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            member = item[0]
            try:
                self.confirm(*item)
            except Exception:
                LOG.exception("checking the report of %s failed", item[3].reporter)
            finally:
                with self._lock:
                    self._pending.discard(member)

    def confirm(self, member: str, host: str, port: int, report: Report) -> bool:
        """Check ``host:port`` and evict ``member`` if it does not answer; True if evicted."""
        started = self.clock()
        if self.probe(host, port, self.timeout_s):
            with self._lock:
                self._alive[member] = self.clock()
                self.counts["alive"] += 1
            LOG.info(
                "not confirmed: %s:%d accepts connections; %s stays in the tree of %s "
                "(reported by %s)",
                host,
                port,
                report.parent,
                report.volume_id,
                report.reporter,
            )
            return False
        why = (
            f"{report.reporter} reported that its parent {report.parent} stopped serving it "
            f"({report.source}), and {host}:{port} did not accept Volt's connection either"
        )
        evicted = self.service.evict_member(member, why)
        with self._lock:
            self._alive.pop(member, None)
            self.counts["evicted" if evicted else "gone"] += 1
        if evicted:
            LOG.info(
                "confirmed the death of %s in %.3f s: evicted, new parents pushed to its children",
                member,
                self.clock() - started,
            )
        return evicted

    def stop(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=5)
