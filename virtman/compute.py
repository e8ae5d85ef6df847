"""``Virtman``: the compute node's API (the original's create / destroy / list).

Results keep the original's convention: ``"0:<info>"`` success, ``"1:<info>"`` warning
(exists / does not exist), ``"2:<info>"`` failure. A failed create leaves nothing behind
and frees the instance name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from brick.wait import pause
from virtman import conf, prefetch, validation
from virtman.baseimage import BaseImage, Status
from virtman.conf import Settings
from virtman.drivers import load_driver
from virtman.errors import InstanceExists, InstanceNotFound, VirtmanError
from virtman.journal import Journal
from virtman.layers.base import Driver, Endpoint
from virtman.voltlink import VoltLink

LOG = logging.getLogger(__name__)
FAST_FOLLOW_S = 1.0  # heartbeat period while a tree parent is still pending


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
        self.volt = volt or VoltLink(
            settings.master_url,
            settings.master_token,
            settings.host_ip,
            ca_file=settings.master_ca_file,
        )
        self.journal = Journal(settings.state_dir / "journal.json")
        self.images: dict[str, BaseImage] = {}
        self.instance_names: dict[str, str] = {}  # instance -> image
        self.lock = threading.Lock()  # guards the two dicts only; never held while building
        self._stop = threading.Event()
        self._wake = threading.Event()
        driver.start()
        self._reconcile()
        self._thread: threading.Thread | None = None
        if heartbeat:
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
            return [f"{name}:{image}" for name, image in sorted(self.instance_names.items())]

    def close(self) -> None:
        """Stop the heartbeat; the stacks stay up (a restart adopts them)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

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
        deadline = clock() + self.reader_grace_s
        while images:
            force = clock() >= deadline
            images = [b for b in images if not b.teardown_if_unused(force=force)]
            if images:
                pause(0.5)
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
            path = self.driver.snapshot.ensure(instance, origin)
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

    def _release(self, instance: str, base: BaseImage) -> None:
        try:
            self.driver.snapshot.teardown(instance)
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
            base = self.images[image]
        self.driver.snapshot.teardown(instance)
        self.journal.drop("instances", instance)
        with self.lock:
            self.instance_names.pop(instance, None)
            base.instances.discard(instance)
        self._wake.set()
        LOG.info("destroyed %s", instance)

    def _new_image(self, image: str, endpoints: list[Endpoint]) -> BaseImage:
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
        )

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
            except Exception:
                LOG.exception("heartbeat failed")
            with self.lock:
                following = any(b.following for b in self.images.values())
            interval = FAST_FOLLOW_S if following else self.settings.heartbeat_interval
            self._wake.wait(interval)
            self._wake.clear()

    def heartbeat(self) -> None:
        """Tear down unused images, refresh liveness, follow parent changes."""
        with self.lock:
            images = list(self.images.values())
        for base in images:
            unused = not base.instances and base.status in (Status.OK, Status.DESTROYING)
            if unused and base.teardown_if_unused():
                with self.lock:
                    if not base.instances and self.images.get(base.name) is base:
                        del self.images[base.name]
        answer = self.volt.heartbeat()
        for base in images:
            if base.status != Status.OK or base.local or base.peer_id is None:
                continue
            parents = answer.get(base.peer_id)
            if parents is None:
                base.rejoin()
            else:
                base.apply_parents(parents)

    # -- restart -------------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """Adopt what the previous run built and is still intact; remove the rest."""
        records = self.journal.images()
        instances = self.journal.instances()
        for image, record in records.items():
            endpoints = validation.connections(record["connections"])
            base = self._new_image(image, endpoints)
            origin = self.driver.origin(image) if record.get("status") == "ok" else None
            users = {i for i, r in instances.items() if r["image"] == image}
            if origin is not None:
                try:
                    base.adopt(origin, record)
                except Exception as exc:
                    LOG.error("%s: cannot adopt (%s); rebuilding", image, exc)
                    origin = None
            if origin is None:
                self._remove_stack(image, base.iqn)
                self.journal.drop("images", image)
                if not users:
                    continue
                try:
                    base.ensure_built()
                except VirtmanError as exc:
                    LOG.error("%s: rebuild failed: %s; its VMs are dropped", image, exc)
                    for instance in users:
                        self.driver.snapshot.teardown(instance)
                        self.journal.drop("instances", instance)
                    continue
            self.images[image] = base
        for instance, record in instances.items():
            base = self.images.get(record["image"])
            if base is None or instance not in self.driver.snapshot.owned():
                LOG.warning("dropping instance %s: its disk or image is gone", instance)
                self.driver.snapshot.teardown(instance)
                self.journal.drop("instances", instance)
                continue
            base.instances.add(instance)
            self.instance_names[instance] = record["image"]
        for instance in set(self.driver.snapshot.owned()) - set(self.instance_names):
            LOG.warning("removing the disk of %s: no create finished for it", instance)
            self.driver.snapshot.teardown(instance)
        for image in self.driver.images() - set(self.images):
            LOG.warning("removing the half-built stack of %s", image)
            self._remove_stack(image)
        self.driver.sweep(set(self.images))
        LOG.info(
            "reconciled: %d image(s), %d instance(s) adopted",
            len(self.images),
            len(self.instance_names),
        )

    def _remove_stack(self, image: str, iqn: str | None = None) -> None:
        for step in (
            lambda: self.driver.relay.teardown(image, iqn),
            lambda: self.driver.cache.teardown(image),
            lambda: self.driver.upstream.teardown(image),
        ):
            try:
                step()
            except Exception as exc:
                LOG.error("%s: cleanup step failed: %s", image, exc)
