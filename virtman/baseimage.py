"""One base image on this node: its block stack, its place in Volt's tree, its VMs.

State machine (per image, guarded by the image's own lock):
empty -> building -> ok -> destroying -> (gone) ; a failed build undoes every step and goes
back to empty. Creates of the same image wait on the lock for one build; the heartbeat
never waits (it skips an image whose lock is busy and tries again next round).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from virtman.errors import ImageBuildFailed
from virtman.journal import Journal
from virtman.layers.base import Device, Driver, Endpoint, Relay
from virtman.prefetch import Prefetcher, PrefetchOptions
from virtman.voltlink import VoltLink, parent_endpoints, pending_parents
from voltclient.client import Volume

LOG = logging.getLogger(__name__)


class Status(enum.StrEnum):
    EMPTY = "empty"
    BUILDING = "building"
    OK = "ok"
    DESTROYING = "destroying"


def portal_host(portal: str) -> str:
    return portal.rpartition(":")[0].strip("[]")


class BaseImage:
    def __init__(
        self,
        name: str,
        connections: list[Endpoint],
        *,
        driver: Driver,
        volt: VoltLink,
        journal: Journal,
        host_ip: str,
        parent_wait_timeout: float,
        prefetch: PrefetchOptions | None = None,
        reader_grace_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        # How long a left image waits for children still reading from its relay. Volt
        # re-parents them as the image leaves, and a live child follows within a heartbeat;
        # the ones still connected after that are leaving too (they froze their paths when
        # they left: two such nodes could wait for each other forever) or stuck.
        self.reader_grace_s = reader_grace_s
        self.clock = clock
        self.left_at: float | None = None
        self.driver = driver
        self.volt = volt
        self.journal = journal
        self.parent_wait_timeout = parent_wait_timeout
        # This node exports the image itself (exact host match: the original's substring
        # test took 10.0.0.1 for 10.0.0.11): read it locally, do not relay or register.
        local = [c for c in connections if portal_host(c.portal) == host_ip]
        self.local = bool(local)
        self.connections = local[:1] or connections
        self.iqn = connections[0].iqn
        self.lock = threading.RLock()
        self.status = Status.EMPTY
        self.peer_id: str | None = None
        self.origin: Device | None = None
        self.relay: Relay | None = None
        self.upstream: list[Endpoint] = []
        self.instances: set[str] = set()
        self.following = False  # a tree parent is still pending: heartbeat sooner
        self.prefetch_waits = False  # the prefetch starts once no parent is pending
        self.prefetch = prefetch
        self.prefetcher: Prefetcher | None = None  # reads the boot trace of a new stack

    # -- build ------------------------------------------------------------------------------
    def ensure_built(self) -> Device:
        """Build the stack (or return it if built); raises ImageBuildFailed, leaving nothing."""
        with self.lock:
            if self.status == Status.OK and self.origin is not None:
                return self.origin
            if self.status == Status.DESTROYING and self.origin is not None:
                self._join_and_register()  # a new VM arrived while the image was leaving
                self.status = Status.OK
                return self.origin
            self.status = Status.BUILDING
            undo: list[tuple[str, Callable[[], None]]] = []
            try:
                self._record()
                endpoints = self.connections
                if not self.local:
                    self.peer_id, parents = self.volt.join(
                        self.name, timeout_s=self.parent_wait_timeout
                    )
                    undo.append(("leave Volt", self._leave))
                    endpoints = self._choose(parents)
                # Each undo is armed before its step: a step that fails half way leaves
                # parts behind, and every teardown is idempotent.
                undo.append(("upstream", lambda: self.driver.upstream.teardown(self.name)))
                upstream = self.driver.upstream.ensure(self.name, endpoints)
                self.upstream = list(endpoints)
                undo.append(("cache", lambda: self.driver.cache.teardown(self.name)))
                origin = self.driver.cache.ensure(self.name, upstream)
                if not self.local:
                    undo.append(("relay", lambda: self.driver.relay.teardown(self.name, self.iqn)))
                    self.relay = self.driver.relay.ensure(self.name, self.iqn, origin)
                    assert self.peer_id is not None
                    self.volt.register(self.name, self.peer_id, self.relay)
                self.origin = origin
                self.status = Status.OK
                self._record()
                LOG.info(
                    "%s: built (%s, reading from %s)",
                    self.name,
                    "local image" if self.local else f"peer {self.peer_id}",
                    ", ".join(e.peer_id or e.portal for e in endpoints),
                )
                self._start_prefetch(origin)
                return origin
            except Exception as exc:
                LOG.error("%s: build failed: %s; undoing %d step(s)", self.name, exc, len(undo))
                for what, step in reversed(undo):
                    try:
                        step()
                    except Exception as undo_exc:  # keep undoing the rest
                        LOG.error("%s: undo of %s failed: %s", self.name, what, undo_exc)
                self._forget()
                raise ImageBuildFailed(self.name, str(exc)) from exc

    def adopt(self, origin: Device, record: dict[str, object]) -> None:
        """Take over a stack a previous run built (after a crash of virtman)."""
        with self.lock:
            self.origin = origin
            self.peer_id = record.get("peer_id")  # type: ignore[assignment]
            self.upstream = self.driver.upstream.endpoints(self.name)
            if not self.local:
                self.relay = self.driver.relay.ensure(self.name, self.iqn, origin)
                self._join_and_register()
            self.status = Status.OK
            self._record()
            LOG.info("%s: adopted the stack left by the previous run", self.name)

    # -- parents ------------------------------------------------------------------------------
    def apply_parents(self, parents: list[Volume]) -> None:
        """Follow Volt's parent list (called by the heartbeat; never waits for a build)."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self.status != Status.OK:
                return
            endpoints = self._choose(parents)
            if [e.key for e in endpoints] != [e.key for e in self.upstream]:
                LOG.info(
                    "%s: parents now %s (were %s)",
                    self.name,
                    [e.peer_id or e.portal for e in endpoints],
                    [e.peer_id or e.portal for e in self.upstream],
                )
                self.driver.upstream.ensure(self.name, endpoints)
                self.upstream = endpoints
            if self.prefetch_waits and not self.following and self.origin is not None:
                self.prefetch_waits = False
                self._start_prefetch(self.origin)
        except Exception as exc:
            LOG.error("%s: could not apply new parents: %s", self.name, exc)
        finally:
            self.lock.release()

    def rejoin(self) -> None:
        """Volt no longer knows this node (evicted, or its store was lost): join again."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self.status == Status.OK and not self.local:
                LOG.warning("%s: Volt lost peer %s; joining again", self.name, self.peer_id)
                self._join_and_register()
        except Exception as exc:
            LOG.error("%s: could not rejoin Volt: %s", self.name, exc)
        finally:
            self.lock.release()

    # -- teardown ------------------------------------------------------------------------------
    def teardown_if_unused(self, *, force: bool = False) -> bool:
        """Leave Volt, then tear down once no child reads from the relay (``force``: even
        if some still do); True when gone."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.instances or self.status == Status.BUILDING:
                return False
            if self.status == Status.EMPTY:
                return True
            if self.status == Status.OK:
                self.status = Status.DESTROYING
                self.left_at = self.clock()
                if self.prefetcher is not None:
                    self.prefetcher.request_stop()  # no VM left to prefetch for
                if self.peer_id and not self.local:
                    self._leave()  # Volt re-parents the children first
            readers = 0
            if self.relay is not None:
                readers = self.driver.relay.readers(self.name, self.iqn)
                waited = self.clock() - (self.left_at or self.clock())
                if readers and not force and waited < self.reader_grace_s:
                    LOG.info("%s: %d child(ren) still read from the relay", self.name, readers)
                    return False
            if not self._end_prefetch(force=force):
                return False
            if self.relay is not None:
                if readers:
                    LOG.warning(
                        "%s: %d reader(s) still connected %.0f s after leaving Volt: removing "
                        "the relay anyway (they fail over to their other parents)",
                        self.name,
                        readers,
                        self.clock() - (self.left_at or self.clock()),
                    )
                self.driver.relay.teardown(self.name, self.iqn, force=bool(readers))
                self.relay = None
            self.driver.cache.teardown(self.name)
            self.driver.upstream.teardown(self.name)
            self._forget()
            LOG.info("%s: torn down", self.name)
            return True
        finally:
            self.lock.release()

    # -- internals -------------------------------------------------------------------------
    def _start_prefetch(self, origin: Device) -> None:
        """Replay the image's boot trace into the new stack's cache (never fails a build)."""
        if self.prefetch is None or self.local:
            return
        if self.following:
            # Placed under parents still building, the node reads from an ancestor or the
            # image server for now: prefetching from there would load the image server with
            # the whole boot set of every node of a burst. Start once the parents are ready.
            LOG.info("%s: the prefetch waits for the tree parents to be ready", self.name)
            self.prefetch_waits = True
            return
        try:
            self.prefetcher = self.prefetch.start(self.name, origin)
        except Exception as exc:
            LOG.error("%s: prefetch not started: %s", self.name, exc)

    def _end_prefetch(self, *, force: bool) -> bool:
        """Stop the prefetch and wait (bounded) for its reads; False while one still runs
        (the stack stays until then, unless ``force``)."""
        prefetcher = self.prefetcher
        if prefetcher is None:
            return True
        assert self.prefetch is not None
        if not prefetcher.stop(self.prefetch.stop_timeout_s) and not force:
            LOG.warning("%s: a prefetch read is still in flight: teardown waits", self.name)
            return False
        if prefetcher.running:
            LOG.warning("%s: tearing down under a prefetch read still in flight", self.name)
        self.prefetcher = None
        return True

    def _choose(self, parents: list[Volume]) -> list[Endpoint]:
        self.following = pending_parents(parents)
        return parent_endpoints(parents) or self.connections

    def _join_and_register(self) -> None:
        self.peer_id, parents = self.volt.join(self.name, timeout_s=self.parent_wait_timeout)
        assert self.relay is not None
        self.volt.register(self.name, self.peer_id, self.relay)
        endpoints = self._choose(parents)
        if [e.key for e in endpoints] != [e.key for e in self.upstream]:
            self.driver.upstream.ensure(self.name, endpoints)
            self.upstream = endpoints
        self._record()

    def _leave(self) -> None:
        if self.peer_id is None:
            return
        try:
            self.volt.leave(self.name, self.peer_id)
        except Exception as exc:  # Volt evicts the node anyway once heartbeats stop naming it
            LOG.warning("%s: could not leave Volt's tree: %s", self.name, exc)

    def _record(self) -> None:
        self.journal.put(
            "images",
            self.name,
            {
                "status": str(self.status),
                "peer_id": self.peer_id,
                "connections": [
                    {"target_portal": c.portal, "target_iqn": c.iqn, "target_lun": c.lun}
                    for c in self.connections
                ],
            },
        )

    def _forget(self) -> None:
        self.status = Status.EMPTY
        self.prefetch_waits = False
        self.left_at = None
        self.origin = None
        self.relay = None
        self.upstream = []
        self.journal.drop("images", self.name)
