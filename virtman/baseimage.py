"""One base image on this node: its block stack, its place in Volt's tree, its VMs.

State machine (per image, guarded by the image's own lock):
empty -> building -> ok -> destroying -> (gone) ; a failed build undoes every step and goes
back to empty. Creates of the same image wait on the lock for one build; the heartbeat
never waits (it skips an image whose lock is busy and tries again next round).

At start, an image whose VMs' disks exist but whose stack cannot be adopted or rebuilt
(Volt unreachable, parents gone, a layer failing) goes to ``degraded``: what still runs of
its stack stays, its VMs' disks and journal records stay, and ``heal`` is retried in the
background with exponential backoff (``Backoff``) until it reaches ``ok``.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from brick import bus, values
from virtman.backoff import Backoff
from virtman.errors import ImageBuildFailed
from virtman.journal import Journal
from virtman.layers.base import Device, Driver, Endpoint, Relay, RelaySpec, UpstreamSpec
from virtman.prefetch import Prefetcher, PrefetchOptions
from virtman.stack import Built, ImageStack, Layer
from virtman.voltlink import VoltLink, parent_endpoints, pending_parents
from voltclient.client import Volume

LOG = logging.getLogger(__name__)
BUSY_WAIT_S = 5.0  # how long the supervisor waits for an image's lock before going on


class Status(enum.StrEnum):
    EMPTY = "empty"
    BUILDING = "building"
    OK = "ok"
    DESTROYING = "destroying"
    DEGRADED = "degraded"


def portal_host(portal: str) -> str:
    return values.Portal.parse(portal, names=True).host


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
        retry: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        events: Callable[[str, dict[str, object], bool], None] | None = None,
    ) -> None:
        self.name = name
        # (event type, payload, is an error): the control bus's notifications (virtman.bus)
        self.events = events
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
        # the journal's form of the connections, made once (every record writes it again)
        self._recorded_connections = [
            {"target_portal": c.portal, "target_iqn": c.iqn, "target_lun": c.lun}
            for c in self.connections
        ]
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
        self.retry = retry or Backoff(5.0, 300.0, clock=clock)  # of a degraded image
        self.problem: str | None = None  # why the image is degraded
        self._healing = threading.Lock()  # held by the one background heal running

    # -- build ------------------------------------------------------------------------------
    def ensure_built(self) -> Device:
        """Build the stack (or return it if built); raises ImageBuildFailed, leaving nothing."""
        with self.lock:
            if self.status == Status.OK and self.origin is not None:
                return self.origin
            if self.status == Status.DESTROYING and self.origin is not None:
                self._join_and_register()  # a new VM arrived while the image was leaving
                self.status = Status.OK
                self._record()
                return self.origin
            if self.status == Status.DEGRADED:
                if self.origin is not None:
                    return self.origin  # the stack serves; only Volt's side is missing
                if not self.heal():
                    raise ImageBuildFailed(
                        self.name,
                        f"the image is degraded ({self.problem}); retried in the background",
                    )
                assert self.origin is not None
                return self.origin
            self.status = Status.BUILDING
            try:
                return self._build()
            except ImageBuildFailed:
                self._forget()
                raise

    def _build(self, *, quiet: bool = False, repair: bool = False) -> Device:
        """Build every layer; a failure undoes every step done and raises ImageBuildFailed
        (the status and the journal record are the caller's). ``quiet``: a retry, whose
        failure the caller reports; ``repair``: the image has VMs, whose cache file stays
        for the next attempt to reuse."""
        with self.lock:
            joined = False
            try:
                self._record()
                # Not placed yet: the stack reads from the image servers until the register
                # answer places the node and names its parents (one Volt request, issue 15).
                endpoints = self.connections
                joined = not self.local  # the register may place it: undo with a leave
                built = self.stack().build(
                    endpoints,
                    keep_cache_file=repair,
                    then=lambda built: self._built(built, endpoints, quiet=quiet),
                )
                LOG.info(
                    "%s: built (%s, reading from %s)",
                    self.name,
                    "local image" if self.local else f"peer {self.peer_id}",
                    ", ".join(e.peer_id or e.portal for e in endpoints),
                )
                sources = [e.peer_id or e.portal for e in endpoints]
                self._event(bus.EVENT_STACK_BUILT, {"peer_id": self.peer_id, "parents": sources})
                self._start_prefetch(built.origin)
                return built.origin
            except Exception as exc:
                # the stack undid its own layers (top first); Volt's side goes last
                (LOG.debug if quiet else LOG.error)("%s: build failed: %s", self.name, exc)
                self._event(bus.EVENT_STACK_FAILED, {"error": str(exc)}, error=True)
                if joined:
                    self._leave()
                self._clear()
                raise ImageBuildFailed(self.name, str(exc)) from exc

    def stack(self) -> ImageStack:
        """This image's block stack (no relay for an image this node serves itself)."""
        return ImageStack(self.driver, self.name, iqn=self.iqn, export=not self.local)

    def _built(self, built: Built, endpoints: list[Endpoint], *, quiet: bool = False) -> None:
        """The last step of a build, after the layers (a failure here undoes them too)."""
        self.upstream = list(endpoints)
        if built.relay is not None:
            self.relay = built.relay
            placed = self.volt.place_and_register(self.name, built.relay)
            if placed is None:  # Volt cannot place on register: query, then register
                self.peer_id, _ = self.volt.join(
                    self.name, timeout_s=self.parent_wait_timeout, quiet=quiet
                )
                parents = self.volt.register(self.name, self.peer_id, built.relay)
            else:
                self.peer_id, parents = placed
            if parents is not None:
                self._follow_registered(parents)
        self.origin = built.origin
        self.status = Status.OK
        self._record()

    def adopt(self, origin: Device, record: dict[str, object]) -> None:
        """Take over a stack a previous run built (after a crash or a restart of virtman).
        What cannot be finished now (the relay, Volt's side) leaves the image degraded,
        with the stack as it runs: retried by ``heal``."""
        with self.lock:
            self.origin = origin
            peer_id = record.get("peer_id")
            self.peer_id = peer_id if isinstance(peer_id, str) else None
            self.upstream = self.driver.upstream.endpoints(self.name)
            try:
                self._finish_adoption(quiet=True)  # Volt away: degraded now, not in 600 s
            except Exception as exc:
                self._degrade(f"cannot adopt the running stack: {exc}")
                return
            self.status = Status.OK
            self._record()
            LOG.info("%s: adopted the stack left by the previous run", self.name)

    def rebuild(self) -> None:
        """Build again the stack of an image whose VMs' disks exist (at start, the old
        stack gone); degraded if that fails now."""
        with self.lock:
            self.status = Status.BUILDING
            try:
                self._build(quiet=True, repair=True)
            except ImageBuildFailed as exc:
                self._degrade(f"cannot rebuild the stack: {exc.reason}")

    def heal(self) -> bool:
        """One repair attempt of a degraded image: finish adopting the stack that runs, or
        build it again; True when the image is (now) not degraded."""
        with self.lock:
            if self.status != Status.DEGRADED:
                return True
            try:
                if self.origin is not None:
                    self._finish_adoption(quiet=True)
                else:
                    self._build(quiet=True, repair=True)
            except ImageBuildFailed as exc:
                self._degrade(f"cannot rebuild the stack: {exc.reason}")
                return False
            except Exception as exc:
                self._degrade(f"cannot adopt the running stack: {exc}")
                return False
            failures = self.retry.failures
            self.status = Status.OK
            self.problem = None
            self.retry.reset()
            self._record()
            LOG.warning(
                "%s: healed (after %d failed attempt(s)): no longer degraded", self.name, failures
            )
            return True

    def when_free(self, step: Callable[[], None], what: str) -> None:
        """Run ``step`` (which takes the image's lock) now if the lock comes within a few
        seconds, else in its own thread once whoever holds it (a build waiting for Volt)
        is done: the caller (the supervisor) must not wait behind a build."""
        if self.lock.acquire(timeout=BUSY_WAIT_S):
            try:
                step()
            finally:
                self.lock.release()
            return
        LOG.info("%s: busy; %s once that ends", self.name, what)
        threading.Thread(target=step, name=f"busy-{self.name}", daemon=True).start()

    def restack(self) -> None:
        """The daemon that held this image's stack died and runs again: build the stack
        again in place (same names, the same cache file, the same place in Volt's tree:
        the relay's address does not change). Degraded if that fails (``heal`` retries)."""
        with self.lock:
            if self.status not in (Status.OK, Status.DEGRADED) or self.origin is None:
                return  # a degraded image without a stack is rebuilt by heal anyway
            if self.prefetcher is not None:
                self.prefetcher.request_stop()  # it read the dead origin
                self._end_prefetch(force=True)
            stack = self.stack()
            try:
                stack.teardown(above=Layer.UPSTREAM, keep_cache_file=True, force=True)
                built = stack.build(self.upstream or self.connections, undo=False)
            except Exception as exc:
                self._clear()
                self._degrade(f"its stack died with its daemon and cannot be rebuilt: {exc}")
                return
            if built.relay is not None:
                self.relay = built.relay
            self.origin = built.origin
            LOG.warning("%s: stack rebuilt after its daemon died", self.name)

    def reexport(self) -> None:
        """tgtd died and runs again: export the relay again (degraded if that fails)."""
        with self.lock:
            if self.local or self.relay is None or self.origin is None:
                return
            try:
                self.relay = self.driver.relay.ensure(RelaySpec(self.name, self.iqn, self.origin))
            except Exception as exc:
                self._degrade(f"cannot export the relay again after tgtd died: {exc}")
                return
            LOG.warning("%s: relay exported again after tgtd died", self.name)

    def heal_in_background(self) -> bool:
        """Start one ``heal`` in its own thread unless one runs; True if started."""
        if not self._healing.acquire(blocking=False):
            return False
        self.retry.next_at = None  # not due again before this attempt ends

        def run() -> None:
            try:
                self.heal()
            except Exception:
                LOG.exception("%s: heal failed", self.name)
            finally:
                self._healing.release()

        threading.Thread(target=run, name=f"heal-{self.name}", daemon=True).start()
        return True

    def _finish_adoption(self, *, quiet: bool = False) -> None:
        if not self.local:
            assert self.origin is not None
            self.relay = self.driver.relay.ensure(RelaySpec(self.name, self.iqn, self.origin))
            self._join_and_register(quiet=quiet)

    def _degrade(self, reason: str) -> None:
        """Mark degraded (WARNING once per change of state or reason), schedule a retry."""
        changed = self.status != Status.DEGRADED or reason != self.problem
        self.status = Status.DEGRADED
        self.problem = reason
        wait = self.retry.failed()
        self._record()
        if changed:
            self._event(bus.EVENT_STACK_DEGRADED, {"reason": reason}, error=True)
            LOG.warning(
                "%s: degraded: %s; its VMs' disks and files are kept, %s; retrying in the "
                "background (next in %.0f s)",
                self.name,
                reason,
                "the running stack serves them"
                if self.origin is not None
                else "no stack serves them",
                wait,
            )
        else:
            LOG.info(
                "%s: still degraded (retry %d); next in %.0f s",
                self.name,
                self.retry.failures,
                wait,
            )

    # -- parents ------------------------------------------------------------------------------
    def apply_parents(self, parents: list[Volume]) -> bool:
        """Follow Volt's parent list (called by the heartbeat and by a bus push; never
        waits for a build). False if the image was busy and nothing was looked at."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.status != Status.OK:
                return True
            endpoints = self._choose(parents)
            if [e.key for e in endpoints] != [e.key for e in self.upstream]:
                LOG.info(
                    "%s: parents now %s (were %s)",
                    self.name,
                    [e.peer_id or e.portal for e in endpoints],
                    [e.peer_id or e.portal for e in self.upstream],
                )
                self.driver.upstream.ensure(UpstreamSpec(self.name, tuple(endpoints)))
                self.upstream = endpoints
            if self.prefetch_waits and not self.following and self.origin is not None:
                self.prefetch_waits = False
                self._start_prefetch(self.origin)
        except Exception as exc:
            LOG.error("%s: could not apply new parents: %s", self.name, exc)
        finally:
            self.lock.release()
        return True

    def _event(self, event_type: str, payload: dict[str, object], *, error: bool = False) -> None:
        if self.events is not None:
            self.events(event_type, {"image": self.name, **payload}, error)

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
            if self.status in (Status.OK, Status.DEGRADED):
                self.status = Status.DESTROYING
                self.retry.reset()
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
            if readers:
                LOG.warning(
                    "%s: %d reader(s) still connected %.0f s after leaving Volt: removing "
                    "the relay anyway (they fail over to their other parents)",
                    self.name,
                    readers,
                    self.clock() - (self.left_at or self.clock()),
                )
            self.stack().teardown(force=bool(readers))
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
            cached_extents = getattr(self.driver, "cached_extents", None)
            cached = None
            if cached_extents is not None:
                name = self.name
                cached = lambda: cached_extents(name)  # noqa: E731
            self.prefetcher = self.prefetch.start(self.name, origin, cached)
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

    def _follow_registered(self, parents: list[Volume]) -> None:
        """Follow the parents of the register answer at once: registering can lift this node
        above its pending ancestors, and in a burst waiting for the next heartbeat meant
        reading from the image server meanwhile (issue 15). A failure to switch is logged
        and left to the heartbeat, which follows the same parents."""
        endpoints = self._choose(parents)
        if [e.key for e in endpoints] == [e.key for e in self.upstream]:
            return
        try:
            self.driver.upstream.ensure(UpstreamSpec(self.name, tuple(endpoints)))
        except Exception as exc:
            LOG.warning("%s: could not follow the parents of the register answer: %s",
                        self.name, exc)  # fmt: skip
            self.following = True  # heartbeat soon: the heartbeat retries the switch
            return
        LOG.info(
            "%s: parents now %s (register answer)",
            self.name,
            [e.peer_id or e.portal for e in endpoints],
        )
        self.upstream = endpoints

    def _join_and_register(self, *, quiet: bool = False) -> None:
        self.peer_id, parents = self.volt.join(
            self.name, timeout_s=self.parent_wait_timeout, quiet=quiet
        )
        assert self.relay is not None
        registered = self.volt.register(self.name, self.peer_id, self.relay)
        endpoints = self._choose(parents if registered is None else registered)
        if [e.key for e in endpoints] != [e.key for e in self.upstream]:
            self.driver.upstream.ensure(UpstreamSpec(self.name, tuple(endpoints)))
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
                "connections": self._recorded_connections,
            },
        )

    def _forget(self) -> None:
        self._clear()
        self.status = Status.EMPTY
        self.journal.drop("images", self.name)

    def _clear(self) -> None:
        """Forget the parts of a stack that is gone (the status and record stay)."""
        self.prefetch_waits = False
        self.left_at = None
        self.origin = None
        self.relay = None
        self.upstream = []
