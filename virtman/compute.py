"""``Virtman``: the compute node's API (the original's create / destroy / list).

Results keep the original's convention: ``"0:<info>"`` success, ``"1:<info>"`` warning
(exists / does not exist), ``"2:<info>"`` failure. A failed create leaves nothing behind
and frees the instance name.

Only ``destroy`` deletes the disk of an instance whose create finished. ``list`` gives the
original's ``"<instance>:<image>"`` entries, and ``"<instance>:<image>:degraded"`` for an
instance whose image is degraded (see ``virtman.baseimage``).
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from brick import bus
from brick.exception import Timeout
from brick.wait import wait_until
from virtman import capture as capturing
from virtman import conf, prefetch, readcounts, stack, validation
from virtman.backoff import Backoff
from virtman.baseimage import BaseImage, Status
from virtman.bus import NodeBus
from virtman.conf import Settings
from virtman.drivers import load_driver
from virtman.errors import (
    Conflict,
    DiskExists,
    InstanceExists,
    InstanceNotFound,
    VirtmanError,
)
from virtman.imageservice import ImageService
from virtman.journal import Journal
from virtman.layers.base import Driver, Endpoint, Revived
from virtman.parentwatch import ParentWatch, Watched
from virtman.supervisor import Supervisor
from virtman.voltlink import VoltLink
from voltclient.client import Volume
from voltclient.exceptions import VoltClientError

LOG = logging.getLogger(__name__)
_Endpoints = list[Endpoint]  # spelled here: ``list`` is a method of Virtman
# After the readers' grace period: how long a shutdown waits for a stack still busy (an
# image building, a lock held by a heal) before it leaves the stacks up and stops.
FORCED_TEARDOWN_S = 120.0
FAST_FOLLOW_S = 1.0  # heartbeat period while a tree parent is still pending
REPORT_FOLLOW_S = 4.0  # ... and for this long after a dead parent was reported over REST
# How long a requested teardown of an idle stack waits for it to be free (a heartbeat holds it).
IDLE_TEARDOWN_S = 10.0


class Virtman:
    def __init__(
        self,
        openstack_compatible: bool = False,
        *,
        settings: Settings | None = None,
        driver: Driver | None = None,
        volt: VoltLink | None = None,
        heartbeat: bool = True,
        config_files: Sequence[str] | None = None,
    ) -> None:
        """``Virtman(openstack_compatible=True)`` is how Nova makes it (the original's
        call): the configuration is read from the original's files (``/etc/nova/nova.conf``
        and ``/etc/virtman/virtman.conf``, or ``config_files``) unless ``CONF`` is parsed
        already. ``settings`` and ``driver`` given: nothing is read."""
        if settings is None:
            conf.load(openstack_compatible=openstack_compatible, config_files=config_files)
            settings = conf.settings_from_conf()
        if driver is None:
            driver = load_driver(conf.CONF.driver, settings)
        self.settings = settings
        self.driver = driver
        self.openstack_compatible = openstack_compatible
        self._stop = threading.Event()  # set by close: ends the heartbeat and Volt waits
        self.volt = volt or VoltLink(
            settings.master_url,
            settings.master_token,
            settings.host_ip,
            ca_file=settings.master_ca_file,
            stop=self._stop,
            api_port=settings.api_port,
        )
        self.journal = Journal(settings.state_dir / "journal.json")
        self.images: dict[str, BaseImage] = {}
        self.instance_names: dict[str, str] = {}  # instance -> image
        self.lock = threading.Lock()  # guards the two dicts only; never held while building
        self._wake = threading.Event()
        self._volt_down = False  # the last heartbeat could not reach Volt
        self._follow_until = 0.0  # heartbeat every FAST_FOLLOW_S until then (monotonic)
        # The control bus (docs/bus.rst): Volt's pushes of new parents, our stack events;
        # made with the background threads below, when a transport_url is set.
        self.bus: NodeBus | None = None
        # The node's image service (set by virtmanserver): where captures are exported.
        self.image_service: ImageService | None = None
        self._captures: dict[str, str] = {}  # image being captured -> its instance
        driver.start()
        self._reconcile()
        # Background threads (the supervisor and the heartbeat) only with ``heartbeat``.
        self.supervisor = Supervisor(driver, settings.daemon_check_interval)
        self.supervisor.listeners.append(self._rebuild_lost)
        self._thread: threading.Thread | None = None
        if heartbeat and settings.transport_url:
            self.bus = NodeBus(settings.transport_url, settings.host_ip, self.apply_pushed)
            self.bus.start()
        # A parent that stops serving is reported to Volt at once (docs/bus.rst).
        self.parent_watch: ParentWatch | None = None
        if heartbeat and settings.parent_check_interval > 0:
            self.parent_watch = ParentWatch(
                self._watched,
                self._failed_paths,
                self._report_dead_parent,
                interval_s=settings.parent_check_interval,
            ).start()
        if heartbeat:
            self.supervisor.start()
            self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat")
            self._thread.daemon = True
            self._thread.start()

    # -- the original API ------------------------------------------------------------------
    def create(
        self,
        instance_name: str,
        image_name: str,
        image_connections: Any,
        snapshot: Any = None,
    ) -> str:
        try:
            path = self._create(instance_name, image_name, image_connections, snapshot)
        except VirtmanError as err:
            LOG.warning("create %r failed: %s", instance_name, err)
            return f"{err.code}:{err}"
        except Exception as exc:
            LOG.exception("create %r failed", instance_name)
            return f"2:Virtman: create failed: {exc}"
        return f"0:{path}"

    def destroy(self, instance_name: str) -> str:
        try:
            self._destroy(instance_name)
        except VirtmanError as err:
            LOG.warning("destroy %r failed: %s", instance_name, err)
            return f"{err.code}:{err}"
        except Exception as exc:
            LOG.exception("destroy %r failed", instance_name)
            return f"2:Virtman: destroy VM instance failed: {exc}"
        return "0:"

    def list(self) -> list[str]:
        with self.lock:
            entries = []
            for name, image in sorted(self.instance_names.items()):
                base = self.images.get(image)
                degraded = base is None or base.status == Status.DEGRADED
                entries.append(f"{name}:{image}:degraded" if degraded else f"{name}:{image}")
            return entries

    def capture(self, instance_name: str, image_name: str) -> str:
        """Flatten the instance's disk into a new base image exported by this node
        (``virtman.capture`` gives the contract: the caller quiesces the disk first).
        ``"0:<file>"``; ``"1:..."`` the name is taken (nothing changed); ``"2:..."``."""
        try:
            captured = self.capture_image(instance_name, image_name)
        except VirtmanError as err:
            LOG.warning("capture of %r into %r failed: %s", instance_name, image_name, err)
            return f"{err.code}:{err}"
        except Exception as exc:
            LOG.exception("capture of %r failed", instance_name)
            return f"2:Virtman: capture failed: {exc}"
        return f"0:{captured.path}"

    def capture_image(
        self, instance_name: str, image_name: str, *, images: ImageService | None = None
    ) -> capturing.Captured:
        """``capture`` raising ``VirtmanError``s; returns the new image's file, size and
        connection (this node's portal)."""
        instance = validation.name(instance_name, "instance_name")
        image = validation.image_name(image_name)
        service = images or self.image_service
        if service is None:
            raise capturing.CaptureFailed(image, "this Virtman has no image service")
        with self.lock:
            source_image = self.instance_names.get(instance)
            if source_image is None:
                raise InstanceNotFound(instance)
            if image in self._captures:
                raise capturing.CaptureExists(image, "a capture into it is running")
            if image in self.images:
                raise capturing.CaptureExists(image, "an image of that name is on this node")
            self._captures[image] = instance  # a destroy of the instance waits for the end
        try:
            record = self.journal.instances().get(instance) or {}
            source = record.get("path")
            if not isinstance(source, str):
                raise capturing.CaptureFailed(image, f"the disk of {instance} is not ready yet")
            captured = capturing.capture(
                service,
                source=source,
                image=image,
                host_ip=self.settings.host_ip,
                iscsi_port=self.settings.iscsi_port,
            )
            return dataclasses.replace(captured, source_image=source_image)
        finally:
            with self.lock:
                self._captures.pop(image, None)

    def drop_idle_image(self, image_name: str, *, timeout_s: float = IDLE_TEARDOWN_S) -> str | None:
        """Tear down this node's stack of ``image_name`` now if nothing uses it (what the
        heartbeat would do soon), so that the image's target can be deleted at once. None:
        no stack of it is left; otherwise why it stays (its instances, or the other nodes
        that read it through this node's relay: never cut off here)."""
        image = validation.image_name(image_name)
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                base = self.images.get(image)
                users = sorted(i for i, m in self.instance_names.items() if m == image)
            if base is None:
                return None
            if users or base.instances:
                return f"instances of this node on it: {', '.join(users or base.instances)}"
            children = (
                self.driver.relay.readers(base.name, base.iqn)
                if base.relay is not None and base.status != Status.EMPTY
                else 0
            )
            if children:
                return (
                    f"{children} other node(s) read it through this node's relay (children "
                    "in the tree): delete it once they are gone"
                )
            if base.teardown_if_unused():
                with self.lock:
                    if not base.instances and self.images.get(image) is base:
                        del self.images[image]
                LOG.info("%s: idle stack torn down on request", image)
                return None
            if time.monotonic() >= deadline:
                return f"this node's stack of it is busy ({base.status.value}): retry"
            if self._stop.wait(0.2):  # building, or the heartbeat holds it right now
                return "this node is stopping: retry"

    def close(self) -> None:
        """Stop the heartbeat and the supervisor; the stacks stay up (a restart adopts
        them)."""
        self.supervisor.stop()
        if self.parent_watch is not None:
            self.parent_watch.stop()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.bus is not None:
            self.bus.stop()

    def shutdown(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Stop. With VMs still on their disks the stacks stay up for the next start to
        adopt; otherwise every image leaves Volt and is torn down (children get a grace
        period to move to other parents), and the daemons that serve nothing stop."""
        self.close()
        with self.lock:
            running = len(self.instance_names)
            images = list(self.images.values())
        if running:
            LOG.info("%d instance(s) still use their disks: the stacks stay up", running)
            return

        def gone(force: bool) -> bool:
            nonlocal images
            images = [b for b in images if not b.teardown_if_unused(force=force)]
            return not images

        def every(what: str, timeout_s: float, force: bool) -> None:
            wait_until(
                lambda: gone(force),
                timeout_s=timeout_s,
                what=what,
                interval_s=0.5,
                backoff=1.0,
                clock=clock,
            )

        try:
            every("children leaving the relays", self.reader_grace_s, force=False)
        except Timeout:
            try:  # readers left after the grace period are cut off
                every("the forced teardown of the stacks", FORCED_TEARDOWN_S, force=True)
            except Timeout:
                LOG.error(
                    "shutdown: the stacks of %s are still busy: left up for the next start",
                    ", ".join(b.name for b in images),
                )
                return
        self.driver.stop()

    # -- create / destroy --------------------------------------------------------------------
    def _create(self, instance_name: str, image_name: str, connections: Any, snapshot: Any) -> str:
        instance = validation.name(instance_name, "instance_name")
        image = validation.image_name(image_name)
        endpoints = validation.connections(connections)
        if snapshot not in (None, ""):
            raise validation.InvalidInput(
                "snapshot", snapshot, f"the {self.driver.name} driver makes its own COW disks"
            )
        with self.lock:
            if instance in self.instance_names:
                raise InstanceExists(instance)
            self.instance_names[instance] = image  # reserved; released on any failure
            base = self.images.get(image)
            if base is None:
                base = self.images[image] = self._new_image(image, endpoints)
            base.instances.add(instance)
        try:
            origin = base.ensure_built()
            # Recorded before the disk exists: a crash leaves a disk a restart knows holds
            # nothing yet (no caller got its path), so that it may remove it.
            if self.driver.snapshot.inspect(instance) is not None:
                raise DiskExists(instance)  # a disk no journal record names: never taken
            self.journal.put("instances", instance, {"image": image, "creating": True})
            path = stack.create_disk(self.driver, instance, origin).path
        except Conflict:
            self._release(instance, base, keep_disk=True)  # not this create's disk
            raise
        except BaseException:
            self._release(instance, base)
            raise
        if base.following:
            # Placed under a parent still building, the image reads from an ancestor or the
            # image server for now: heartbeat at once (and every second after) rather than
            # at the end of the current period, to move to the parent as soon as it is ready.
            self._wake.set()
        self.journal.put("instances", instance, {"image": image, "path": path})
        LOG.info("created %s on %s: %s", instance, image, path)
        return path

    def _release(self, instance: str, base: BaseImage, *, keep_disk: bool = False) -> None:
        try:
            if not keep_disk:
                stack.remove_disk(self.driver, instance)
            self.journal.drop("instances", instance)
        finally:
            with self.lock:
                self.instance_names.pop(instance, None)
                base.instances.discard(instance)
                if base.status == Status.EMPTY and not base.instances:
                    self.images.pop(base.name, None)
            self._wake.set()  # an unused image is torn down by the heartbeat thread

    def _destroy(self, instance_name: str) -> None:
        instance = validation.name(instance_name, "instance_name")
        with self.lock:
            image = self.instance_names.get(instance)
            if image is None:
                raise InstanceNotFound(instance)
            if instance in self._captures.values():
                raise VirtmanError(f"Virtman: {instance} is being captured: destroy it after")
            base = self.images.get(image)  # None: kept at start without its image record
        stack.remove_disk(self.driver, instance)
        self.journal.drop("instances", instance)
        with self.lock:
            self.instance_names.pop(instance, None)
            if base is not None:
                base.instances.discard(instance)
        self._wake.set()
        LOG.info("destroyed %s", instance)

    def _new_image(self, image: str, endpoints: _Endpoints) -> BaseImage:
        return BaseImage(
            image,
            endpoints,
            driver=self.driver,
            volt=self.volt,
            journal=self.journal,
            host_ip=self.settings.host_ip,
            parent_wait_timeout=self.settings.parent_wait_timeout,
            prefetch=prefetch.options_from(self.settings),
            reader_grace_s=self.reader_grace_s,
            retry=Backoff(self.settings.degraded_retry_min, self.settings.degraded_retry_max),
            events=self._bus_event,
        )

    def _bus_event(self, event_type: str, payload: dict[str, object], error: bool) -> None:
        if self.bus is not None:
            self.bus.event(event_type, payload, error=error)

    @property
    def reader_grace_s(self) -> float:
        """How long a left image keeps its relay for children still reading from it: two
        heartbeats for them to follow Volt's new parents, plus an NBD reconnect."""
        return min(2 * self.settings.heartbeat_interval + self.settings.nbd_reconnect_delay, 60.0)

    # -- heartbeat -----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.heartbeat()
            except VoltClientError as exc:
                # Losing Volt changes nothing here: the stacks keep serving their VMs and
                # children, and the heartbeat goes on. Logged once per change.
                if not self._volt_down:
                    LOG.warning("Volt unreachable (%s): the stacks keep serving; retrying", exc)
                self._volt_down = True
            except Exception:
                LOG.exception("heartbeat failed")
            self._wake.wait(self._next_round_s())
            self._wake.clear()

    def _next_round_s(self) -> float:
        """The heartbeat period; sooner while a parent is pending or a retry is due."""
        with self.lock:
            images = list(self.images.values())
        wait = self.settings.heartbeat_interval
        if any(b.following for b in images) or time.monotonic() < self._follow_until:
            wait = FAST_FOLLOW_S
        for base in images:
            due = base.retry.remaining() if base.status == Status.DEGRADED else None
            if due is not None:
                wait = min(wait, max(due, 0.2))
        return wait

    def heartbeat(self) -> None:
        """Tear down unused images, retry degraded ones, refresh liveness, follow parent
        changes."""
        with self.lock:
            images = list(self.images.values())
        for base in images:
            unused = not base.instances and base.status in (
                Status.OK,
                Status.DESTROYING,
                Status.DEGRADED,
            )
            if unused and base.teardown_if_unused():
                with self.lock:
                    if not base.instances and self.images.get(base.name) is base:
                        del self.images[base.name]
        for base in images:
            if base.status == Status.DEGRADED and base.retry.remaining() == 0:
                base.heal_in_background()
        answer = self.volt.heartbeat(readcounts.collect(self.driver, images))
        if self._volt_down:
            LOG.warning("Volt reachable again")
            self._volt_down = False
        for base in images:
            if base.status != Status.OK or base.local or base.peer_id is None:
                continue
            parents = answer.get(base.peer_id)
            if parents is None:
                base.rejoin()
            else:
                base.apply_parents(parents)

    def apply_pushed(self, pushed: dict[str, builtins.list[Volume]]) -> None:
        """Volt pushed new parents over the bus: follow them at once, as a heartbeat answer
        (an image busy now is left to the next heartbeat, which comes at once)."""
        with self.lock:
            images = list(self.images.values())
        busy = False
        for base in images:
            parents = pushed.get(base.peer_id) if base.peer_id is not None else None
            if parents is None or base.status != Status.OK or base.local:
                continue
            if not base.apply_parents(parents):
                busy = True
        if busy:
            self._wake.set()

    # -- dead parents ----------------------------------------------------------------------------
    def _watched(self) -> builtins.list[Watched]:
        """The images this node reads from parents, for the parent watch."""
        with self.lock:
            images = list(self.images.values())
        return [
            Watched(b.name, b.peer_id, tuple(b.upstream))
            for b in images
            if b.status == Status.OK and not b.local and b.peer_id is not None and b.upstream
        ]

    def _failed_paths(self, image: str) -> _Endpoints:
        """The paths of ``image`` whose reads failed since the last call (drivers that can
        tell; the dm and qemu drivers can)."""
        failed = getattr(self.driver.upstream, "failed_paths", None)
        return failed(image) if failed is not None else []

    def _report_dead_parent(self, image: str, peer_id: str, parent: str, attempt: int) -> None:
        """Tell Volt: the first report over the bus when it is up (the REST API if that send
        fails), the others (the parent is still ours: the first may be lost) over REST."""

        def over_rest() -> None:
            try:
                result = self.volt.report_dead_parent(image, peer_id, parent)
            except VoltClientError as exc:
                LOG.warning("%s: Volt did not take the report on %s: %s", image, parent, exc)
                return
            LOG.info("%s: reported parent %s to Volt (REST): %s", image, parent, result)
            # No push will come (no bus): ask Volt for the new parents now and every second
            # for a few seconds, while it checks the parent and evicts it.
            self._follow_until = time.monotonic() + REPORT_FOLLOW_S
            self._wake.set()

        if attempt == 0 and self.bus is not None and self.bus.up:
            payload = {"image": image, "peer_id": peer_id, "parent": parent}
            self.bus.event(bus.EVENT_PARENT_DEAD, payload, error=True, fallback=over_rest)
            LOG.info("%s: reported parent %s to Volt (bus)", image, parent)
            return
        over_rest()

    # -- daemons -------------------------------------------------------------------------------
    def _rebuild_lost(self, revived: Revived) -> None:
        """A node daemon died and runs again: rebuild every image's part that lived in it."""
        with self.lock:
            images = list(self.images.values())
        for base in images:
            if revived.stacks:
                base.when_free(base.restack, "the stack is rebuilt")
            elif revived.targets:
                base.when_free(base.reexport, "the relay is exported again")
        self._wake.set()  # tell Volt soon that this node lives (and follow its answer)

    # -- restart -------------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """Adopt what the previous run built. An image with VMs whose stack cannot be
        adopted or rebuilt now stays, degraded, and is retried in the background; only the
        stacks no VM uses and the disks of creates that never finished are removed."""
        records = self.journal.images()
        instances = self.journal.instances()
        for image, record in records.items():
            endpoints = validation.connections(record["connections"])
            base = self._new_image(image, endpoints)
            adoptable = record.get("status") in (Status.OK, Status.DEGRADED)
            origin = self.driver.origin(image) if adoptable else None
            users = {i for i, r in instances.items() if r["image"] == image}
            if origin is not None:
                base.adopt(origin, record)  # degraded if Volt or the relay cannot follow
            elif users:
                LOG.warning("%s: the stack is gone; rebuilding it for its VMs", image)
                base.stack().teardown(keep_cache_file=True, check=False)
                base.rebuild()  # degraded if it cannot be built now
            else:
                base.stack().teardown(check=False)
                self.journal.drop("images", image)
                continue
            self.images[image] = base
        owned = set(self.driver.snapshot.list_owned())
        for instance, record in instances.items():
            if record.get("creating"):
                # No caller got this disk's path: no VM ever wrote to it.
                LOG.warning("removing the disk of %s: its create did not finish", instance)
                stack.remove_disk(self.driver, instance)
                self.journal.drop("instances", instance)
                continue
            if instance not in owned:
                LOG.warning("forgetting instance %s: its disk is gone (nothing deleted)", instance)
                self.journal.drop("instances", instance)
                continue
            owner = self.images.get(record["image"])
            if owner is None:
                LOG.warning(
                    "instance %s: its image %s has no record: the disk is kept and listed "
                    "degraded until destroyed",
                    instance,
                    record["image"],
                )
            else:
                owner.instances.add(instance)
            self.instance_names[instance] = record["image"]
        for instance in owned - set(self.instance_names) - set(instances):
            LOG.warning(
                "the disk of %s is in no journal record: kept, not listed (a create of that "
                "name is refused until it is moved away)",
                instance,
            )
        stack.sweep(self.driver, self.driver.images() - set(self.images))
        self.driver.sweep(set(self.images))
        degraded = sorted(b.name for b in self.images.values() if b.status == Status.DEGRADED)
        LOG.info(
            "reconciled: %d image(s), %d instance(s) adopted%s",
            len(self.images),
            len(self.instance_names),
            f"; degraded: {', '.join(degraded)}" if degraded else "",
        )
