"""A child's report that its parent stopped serving it: confirm, then evict at once
(docs/bus.rst, "Detecting a dead parent").

A report names (image, the child's peer id, the parent's peer id) and arrives over the bus
(a ``vmthunder.parent.dead`` notification) or the REST API. One child's word never evicts a
live node: Volt connects to the port the child reads the parent from (TCP, ``timeout_s``)
and evicts the parent's host, exactly as the evictor does, only when that connect is
refused or unanswered; the eviction pushes the new parents to every affected child.

A refused data port does not always mean a dead host: when only the parent's data daemon
died (qemu-storage-daemon, tgtd) its node daemon (virtmanserver) is restarting it. So when
the data port refuses, Volt also connects to the port of the node daemon's own API that the
host announced in its heartbeats (``api_port``, used for nothing else): if that accepts, the
host is repairing and is not evicted now; its data port is checked again after
``repair_grace_s`` and the host evicted only if it still refuses. A host that announced no
port, or whose node daemon does not accept either, is evicted at once.

The check runs in this module's thread, never in volt-api's event loop. Reports of a host
whose check is queued, under way or waiting out a repair's grace are folded into it, a host
found alive is not checked again for ``alive_hold_s``, and a parent evicted already is found
gone: many children reporting the same death make one check and one eviction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from brick.net import accepts

if TYPE_CHECKING:
    from volt.service import VoltService

LOG = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 0.5
ALIVE_HOLD_S = 2.0
REPAIR_GRACE_S = 10.0
QUEUE_SIZE = 1000
POLL_S = 0.2  # the longest the thread sleeps while a repair's grace runs (an injected clock)

Probe = Callable[[str, int, float], bool]  # (host, port, timeout) -> accepts connections


@dataclass(frozen=True)
class Report:
    volume_id: str
    reporter: str  # the child's peer id
    parent: str  # the parent's peer id
    source: str  # "bus" or "api", for the log


@dataclass(frozen=True)
class Repair:
    """A host whose data port refused while its node daemon accepted: checked again at
    ``due``."""

    member: str
    host: str
    port: int
    api_port: int
    report: Report
    started: float  # when the check that found it repairing began (the clock's time)
    due: float


class DeathWatch:
    def __init__(
        self,
        service: VoltService,
        *,
        probe: Probe = accepts,
        timeout_s: float = CONFIRM_TIMEOUT_S,
        alive_hold_s: float = ALIVE_HOLD_S,
        repair_grace_s: float = REPAIR_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.probe = probe
        self.timeout_s = timeout_s
        self.alive_hold_s = alive_hold_s
        self.repair_grace_s = repair_grace_s
        self.clock = clock
        # checking, folded, gone, alive, evicted; repairing (the node daemon answered),
        # repaired (the data port accepted again after the grace)
        self.counts: Counter[str] = Counter()
        self._pending: set[str] = set()  # hosts whose check is queued, running or in a grace
        self._repairs: dict[str, Repair] = {}  # host -> its repair's second check (thread's)
        self._alive: dict[str, float] = {}  # host -> when a check found it serving
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, str, int, Report] | tuple[()] | None] = queue.Queue(
            QUEUE_SIZE
        )
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
        while True:
            try:
                item = self._queue.get(timeout=self._wait())
            except queue.Empty:
                item = ()  # a repair may be due
            if item is None:
                return
            if item:
                self._check(item[3].reporter, item[0], partial(self.confirm, *item))
            for repair in self._due():
                self._check(repair.report.reporter, repair.member, partial(self.recheck, repair))

    def _check(self, reporter: str, member: str, check: Callable[[], bool]) -> None:
        """Run one check (in the thread); its host stays pending while a repair's grace runs."""
        try:
            check()
        except Exception:
            LOG.exception("checking the report of %s failed", reporter)
            with self._lock:
                self._repairs.pop(member, None)
        finally:
            with self._lock:
                if member not in self._repairs:
                    self._pending.discard(member)

    def _wait(self) -> float | None:
        """How long the thread may wait for a report: until the next repair is due."""
        with self._lock:
            if not self._repairs:
                return None
            due = min(r.due for r in self._repairs.values())
        return min(max(due - self.clock(), 0.0), POLL_S)

    def _due(self) -> list[Repair]:
        """The repairs whose grace is over, taken out (their hosts stay pending)."""
        now = self.clock()
        with self._lock:
            due = [r for r in self._repairs.values() if r.due <= now]
            for repair in due:
                del self._repairs[repair.member]
        return due

    def confirm(self, member: str, host: str, port: int, report: Report) -> bool:
        """Check ``host:port`` and evict ``member`` if it does not answer, unless its node
        daemon does (then a second check is due after the grace); True if evicted."""
        started = self.clock()
        if self.probe(host, port, self.timeout_s):
            self._found_alive(member)
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
        api_port = self.service.api_port(member)
        if api_port is None:
            why += f"; {member} announced no node daemon port"
        elif self.probe(host, api_port, self.timeout_s):
            repair = Repair(
                member, host, port, api_port, report, started, self.clock() + self.repair_grace_s
            )
            with self._lock:
                self._repairs[member] = repair
                self.counts["repairing"] += 1
            LOG.info(
                "%s:%d refuses connections but %s's node daemon accepts on %s:%d: repairing, "
                "not evicted; %s stays in the tree of %s, its data port checked again in "
                "%.1f s (reported by %s)",
                host,
                port,
                member,
                host,
                api_port,
                report.parent,
                report.volume_id,
                self.repair_grace_s,
                report.reporter,
            )
            return False
        else:
            why += f", nor its node daemon's {host}:{api_port}"
        return self._evict(member, why, started)

    def recheck(self, repair: Repair) -> bool:
        """The grace of a repairing host is over: evict it if its data port still refuses;
        True if evicted."""
        host, port = repair.host, repair.port
        if self.probe(host, port, self.timeout_s):
            self._found_alive(repair.member)
            self._count("repaired")
            LOG.info(
                "repaired: %s:%d accepts connections again %.1f s after the report of %s; "
                "%s stays in the tree of %s",
                host,
                port,
                self.clock() - repair.started,
                repair.report.reporter,
                repair.report.parent,
                repair.report.volume_id,
            )
            return False
        report = repair.report
        why = (
            f"{report.reporter} reported that its parent {report.parent} stopped serving it "
            f"({report.source}), and {host}:{port} still did not accept Volt's connection "
            f"{self.repair_grace_s:.1f} s after its node daemon answered on {host}:"
            f"{repair.api_port}"
        )
        return self._evict(repair.member, why, repair.started)

    def _found_alive(self, member: str) -> None:
        with self._lock:
            self._alive[member] = self.clock()
            self.counts["alive"] += 1

    def _evict(self, member: str, why: str, started: float) -> bool:
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
