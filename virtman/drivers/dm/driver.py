"""The kernel driver: open-iscsi paths, dm-multipath, bcache, LIO relays, dm snapshots.

Per image (names from the original where it had them)::

    paths        one iSCSI session per parent (ISCSIConnector, CHAP): /dev/sdX
    multipath    multipath_<image>: read-only, one priority group per path in Volt's order,
                 so reads go to the first (the tree parent) and the others are standby
    cache        cachebk_<image> (8 KiB header slot + the multipath device) cached by the
                 node's one bcache cache set -> /dev/bcacheN -> cached_<image> (linear)
    origin       origin_<image>: snapshot-origin over cached_<image>
    relay        relay_<image> (linear over cached_<image>) exported by LIO under the
                 image's IQN, LUN 1, read-only, CHAP (or by tgtd: dm_relay = tgt);
                 with dm_nbd_relay also cached_<image> as NBD export <image> (nbd.py)
    snapshot     snapshot_<instance>: persistent COW (a sparse file on a loop device) over
                 cached_<image>; the VM's disk is /dev/mapper/snapshot_<instance>

Everything is found again from the kernel (``dmsetup``, bcache's sysfs, LIO's configfs,
``iscsiadm -m session``, ``losetup``) plus one file per image listing its parents
(``run_dir/paths``), so a restarted virtman adopts what is there. Every dm device of ours
carries a ``VMT-`` UUID; nothing without one is touched. All root commands go through the
injected ``Host`` (tests pass fakes). A thread checks the multipath devices every
``MONITOR_INTERVAL_S``: it reinstates paths that came back, moves reads back to the first
path, and bounds queueing with no path to ``dm_no_path_retry`` seconds.
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from brick import values
from brick.dm import Linear, Multipath, MultipathMonitor, Snapshot, Table, scsi_path_ready
from brick.dm.parse import MultipathStatus
from brick.exception import BrickError, NotFound, PathsUnavailable
from brick.fileio import FILE_MODE, private_dir
from brick.iscsi import ISCSIConnector, validate_lun
from brick.lio import LioTargets
from brick.periodic import Periodic
from brick.tgt import Chap, TgtAdm, TgtDaemon, validate_iqn, validate_portal
from virtman import stack
from virtman.conf import Settings
from virtman.drivers.dm.cache import BcacheLayer, CacheSet
from virtman.drivers.dm.context import DmContext, Host, Loops
from virtman.drivers.dm.names import SNAPSHOT, ImageNames, snapshot_name, uuid_of
from virtman.drivers.dm.nbd import NbdRelay
from virtman.errors import Conflict, DiskExists, adopting
from virtman.layers import base as layer
from virtman.layers.pathsfile import PathsFiles

__all__ = ["DmDriver", "FailoverMultipath", "Host", "Loops"]

LOG = logging.getLogger(__name__)

MODULES = ("dm-multipath", "dm-queue-length", "dm-snapshot", "bcache", "iscsi_tcp", "loop")
LIO_MODULES = ("target_core_iblock", "iscsi_target_mod")
MONITOR_INTERVAL_S = 2.0


@dataclass(frozen=True, kw_only=True)
class FailoverMultipath(Multipath):
    """dm-multipath with one priority group per path, in order (multipath-tools' "failover"
    grouping): I/O goes to the first path while it works; the kernel moves to the next group
    when it fails. ``0 N multipath 1 queue_if_no_path 0 2 1 queue-length 0 1 1 a 1
    queue-length 0 1 1 b 1``."""

    repeat: int = 1

    def _args(self, paths: Sequence[str], repeat: int, queue: bool) -> list[str]:
        features = ["1", "queue_if_no_path"] if queue else ["0"]
        per_path = self._path_args(repeat)
        args = [*features, "0", str(len(paths)), "1"]
        for path in paths:
            args += [self.selector, "0", "1", str(len(per_path)), path, *per_path]
        return args


class DmDriver:
    """The ``dm`` driver (see the module docstring)."""

    name = "dm"

    def __init__(
        self,
        settings: Settings,
        *,
        host: Host | None = None,
        timeout_s: float = 30.0,
        monitor_interval_s: float = MONITOR_INTERVAL_S,
    ) -> None:
        if not (settings.chap_user and settings.chap_password):
            raise ValueError("the dm driver exports relays with CHAP: set chap_user/password")
        if settings.dm_relay == "lio" and settings.dm_image_port == settings.iscsi_port:
            raise ValueError("dm_image_port must differ from iscsi_port (LIO listens there)")
        self.settings = settings
        self.host = host or Host()
        self.timeout_s = timeout_s
        self.chap = Chap(settings.chap_user, settings.chap_password)
        h = self.host
        self.context = DmContext(settings, h, timeout_s=timeout_s)  # what the layers share
        self.dm = self.context.dm
        self.bcache = self.context.bcache
        self.loops = self.context.loops
        self.lock = self.context.lock
        self.kname = self.context.kname
        self.owned = self.context.owned
        self.is_ours = self.context.is_ours
        self.remove = self.context.remove
        self.iscsi = ISCSIConnector(execute=h.execute, by_path_dir=h.by_path_dir, sysfs=h.sysfs)
        self.lio = LioTargets(rtslib=h.rtslib)
        self.paths = PathsFiles(settings.run_dir)
        self.portal = validate_portal(f"{_bracket(settings.host_ip)}:{settings.iscsi_port}")
        # tgtd: the relay when dm_relay = tgt, or the image service's (create_image_target)
        tgt_port = settings.iscsi_port if settings.dm_relay == "tgt" else settings.dm_image_port
        self.tgtd: TgtDaemon | None = None
        if tgt_port:
            portal = f"{_bracket(settings.host_ip)}:{tgt_port}"
            self.tgtd = TgtDaemon(settings.tgt_control_port, [portal], run_dir=settings.run_dir)
        self.tgt = TgtAdm(settings.tgt_control_port)  # virtmanserver's ImageService uses it
        self.cacheset = CacheSet(self.context)
        self.upstream = DmUpstream(self)
        self.cache = BcacheLayer(self.context, self.cacheset)
        self.relay: LioRelay | TgtRelay = (
            TgtRelay(self) if settings.dm_relay == "tgt" else LioRelay(self)
        )
        self.snapshot = DmSnapshot(self)
        self.nbd = NbdRelay(settings, h.qsd) if settings.dm_nbd_relay else None
        self._monitors: dict[str, MultipathMonitor] = {}
        self._monitor = Periodic(
            "dm-multipath", monitor_interval_s, self._monitor_round, join_timeout_s=10
        )

    # -- daemons -----------------------------------------------------------------------------
    def start(self) -> None:
        """Load the modules, start or adopt the cache set (and tgtd), start the monitor."""
        modules = MODULES + (LIO_MODULES if self.settings.dm_relay == "lio" else ())
        for module in modules:
            self.host.execute(["modprobe", module])
        for d in (
            self.settings.run_dir,
            self.settings.instances_dir,
            self.settings.run_dir / "paths",
        ):
            private_dir(d)
        if self.tgtd is not None and not self.tgtd.adopt():
            self.tgtd.start()
        self.cacheset.start()
        if self.nbd is not None:
            self.nbd.start()
        else:
            self.nbd = NbdRelay.leftover(self.settings, self.host.qsd)
        self._monitor.start()

    def revive(self) -> layer.Revived:
        """The kernel holds the stacks; only tgtd (a relay with ``dm_relay = tgt``, the
        image targets) can die. (The NBD relay's daemon is revived by the monitor.)"""
        if self.tgtd is None or self.tgtd.alive():
            return layer.Revived()
        LOG.error(
            "tgtd (control port %d) died: starting it again; its targets are exported again",
            self.tgtd.control_port,
        )
        self.tgtd.start()
        return layer.Revived(targets=True)

    def stop(self) -> None:
        """Stop the monitor; remove the cache set and stop tgtd if nothing uses them."""
        self._monitor.stop()
        if self.nbd is not None:
            self.nbd.stop()
        self.cacheset.stop()
        if self.tgtd is not None and not self.tgt.targets():
            self.tgtd.stop()

    def halt(self) -> None:
        """tgtd through tgtadm (it ignores SIGTERM) and the NBD relay's daemon; the
        kernel's stacks go with the host. A failed tgtd stop still stops the other."""
        try:
            if self.tgtd is not None:
                self.tgtd.stop()
        finally:
            nbd = self.nbd or NbdRelay.leftover(self.settings, self.host.qsd)
            if nbd is not None:
                nbd.qsd.stop()

    # -- what exists ----------------------------------------------------------------------------
    def images(self) -> set[str]:
        return stack.images(self)

    def origin(self, image: str) -> layer.Device | None:
        if not self.is_ours(ImageNames(image).multipath, "multipath", image):
            return None
        return self.cache.inspect(image)

    def sweep(self, keep: set[str]) -> None:
        """Tear down every image of ours not in ``keep`` (relay, cache, paths), and LIO or
        tgt relays of ours that belong to no image."""
        stack.sweep(self, self.images() - keep)
        self.relay.sweep(keep)
        if self.nbd is not None:
            self.nbd.sweep(keep)

    # -- multipath monitoring ------------------------------------------------------------------
    def _monitor_round(self) -> None:
        try:
            self.check_paths()
        except Exception:
            LOG.exception("multipath check failed")
        try:
            self.check_nbd()
        except Exception:
            LOG.exception("NBD relay check failed")

    def check_nbd(self) -> None:
        """Start the NBD relay daemon again if it died, with every relay's export."""
        if self.nbd is not None:
            self.nbd.heal(
                lambda: {i: ImageNames(i).path(ImageNames(i).cached) for i in self.relay.images()}
            )

    def check_paths(self) -> None:
        """One round of the monitor over every multipath device of ours."""
        images = self.owned("multipath")
        for gone in set(self._monitors) - set(images):
            del self._monitors[gone]
        for image in images:
            name = ImageNames(image).multipath
            monitor = self._monitors.get(image)
            if monitor is None:
                monitor = self._monitors[image] = MultipathMonitor(
                    self.dm,
                    name,
                    no_path_retry_s=float(self.settings.dm_no_path_retry),
                    path_ready=lambda devno: scsi_path_ready(devno, str(self.host.sysfs)),
                )
            with self.lock:
                try:
                    status = monitor.check()
                    if status.failed_paths:  # some may have been reinstated just now
                        status = self.dm.multipath_status(name)
                except NotFound:
                    continue
                first = status.groups[0] if status.groups else None
                if first and first.paths and first.paths[0].active and status.next_group != 1:
                    LOG.info("%s: the first path works again: reads go back to it", name)
                    self.dm.switch_group(name, 1)


def failed_endpoints(
    status: MultipathStatus, endpoints: Sequence[layer.Endpoint]
) -> list[layer.Endpoint]:
    """The endpoints whose path group has no working path (one group per endpoint, in
    order: ``FailoverMultipath``). A table that does not match the endpoints (a reload
    under way) tells nothing: no endpoint."""
    if len(status.groups) != len(endpoints):
        return []
    return [
        e
        for group, e in zip(status.groups, endpoints, strict=True)
        if group.paths and not any(p.active for p in group.paths)
    ]


def _bracket(host: str) -> str:
    return values.bracket(host)


def _target(endpoint: layer.Endpoint) -> tuple[str, str, int]:
    """An endpoint's iSCSI target, validated (NBD addresses are not used by this driver)."""
    return (
        validate_portal(endpoint.portal),
        validate_iqn(endpoint.iqn),
        validate_lun(endpoint.lun),
    )


class DmUpstream:
    """Paths (iSCSI sessions) and ``multipath_<image>`` over them."""

    def __init__(self, driver: DmDriver) -> None:
        self.d = driver

    def endpoints(self, image: str) -> list[layer.Endpoint]:
        return self.d.paths.load(image)

    def _save(self, image: str, endpoints: Sequence[layer.Endpoint]) -> None:
        self.d.paths.save(image, endpoints)

    def failed_paths(self, image: str) -> list[layer.Endpoint]:
        """The paths of ``image`` the kernel failed (``dmsetup status`` of its multipath
        device): a failed read marks its path ``F`` until the monitor reinstates it."""
        try:
            status = self.d.dm.multipath_status(ImageNames(image).multipath)
        except BrickError:
            return []
        return failed_endpoints(status, self.endpoints(image))

    def read_counters(self, image: str) -> dict[layer.Endpoint, int]:
        """Sectors read from each path's SCSI disk (``/sys/block/sdX/stat``, field 3), in
        bytes: the kernel's own count of what multipath read through that path."""
        found = {}
        for endpoint in self.endpoints(image):
            disk = os.path.basename(
                self.d.host.realpath(self.d.iscsi.device_path(*_target(endpoint)))
            )
            try:
                fields = (self.d.host.sysfs / "block" / disk / "stat").read_text().split()
                found[endpoint] = int(fields[2]) * 512
            except (OSError, IndexError, ValueError):
                continue  # not connected now (or not a disk): nothing to count
        return found

    def inspect(self, image: str) -> layer.Device | None:
        n = ImageNames(image)
        if not self.d.is_ours(n.multipath, "multipath", image):
            return None
        path = n.path(n.multipath)
        return layer.Device(n.multipath, path, self.d.dm.size(path) * 512)

    def list_owned(self) -> list[str]:
        return sorted(set(self.d.owned("multipath")) | self.d.paths.images())

    def ensure(self, spec: layer.UpstreamSpec) -> layer.Device:
        image, endpoints = spec.image, spec.endpoints
        n = ImageNames(image)
        d = self.d
        wanted: list[layer.Endpoint] = []
        for endpoint in endpoints:  # validate all first; one endpoint per target
            if _target(endpoint) not in {_target(e) for e in wanted}:
                wanted.append(endpoint)
        current = self.endpoints(image)
        known = {_target(e) for e in current}
        # record the paths before connecting them: a crash leaves nothing unrecorded
        self._save(image, [*current, *(e for e in wanted if _target(e) not in known)])
        usable: list[tuple[layer.Endpoint, str]] = []
        for endpoint in wanted:
            portal, iqn, lun = _target(endpoint)
            try:
                link = d.iscsi.connect(portal, iqn, lun, d.chap)
            except BrickError as exc:
                LOG.warning("%s: path %s unusable: %s", image, endpoint.key, exc)
                continue
            usable.append((endpoint, d.host.realpath(link)))
        try:
            if not usable:
                raise PathsUnavailable(image, [e.key for e in wanted])
            with d.lock:
                usable, size = self._sized(image, usable)
                table = Table.of(FailoverMultipath(length=size, paths=tuple(p for _, p in usable)))
                if d.is_ours(n.multipath, "multipath", image):
                    if not table.matches(d.dm.table(n.multipath), d.host.devno):
                        d.dm.reload(n.multipath, table)
                        LOG.info("%s: paths now %s", image, [e.key for e, _ in usable])
                else:
                    d.dm.create(n.multipath, table, uuid=n.uuid("multipath"), readonly=True)
        except BaseException:
            self._disconnect(image, [e for e in wanted if _target(e) not in known])
            self._save(image, current)
            raise
        kept = {_target(e) for e, _ in usable}
        self._save(image, [e for e, _ in usable])
        self._disconnect(image, [e for e in [*current, *wanted] if _target(e) not in kept])
        return layer.Device(n.multipath, n.path(n.multipath), size * 512)

    def _sized(
        self, image: str, usable: list[tuple[layer.Endpoint, str]]
    ) -> tuple[list[tuple[layer.Endpoint, str]], int]:
        """Keep the paths as big as the first (a parent exporting something else is
        dropped); returns them and the size in sectors."""
        size = self.d.dm.size(usable[0][1])
        same = [(e, p) for e, p in usable if p == usable[0][1] or self.d.dm.size(p) == size]
        for endpoint, path in usable:
            if (endpoint, path) not in same:
                LOG.warning("%s: path %s has another size: not used", image, endpoint.key)
        return same, size

    def _disconnect(self, image: str, endpoints: Sequence[layer.Endpoint]) -> None:
        for endpoint in endpoints:
            try:
                self.d.iscsi.disconnect(*_target(endpoint))
            except BrickError as exc:
                LOG.warning("%s: could not close path %s: %s", image, endpoint.key, exc)

    def teardown(self, image: str) -> None:
        n = ImageNames(image)
        with self.d.lock:
            self.d.remove(n.multipath, "multipath", image)
        for endpoint in self.endpoints(image):
            self.d.iscsi.disconnect(*_target(endpoint))
        self.d.paths.remove(image)


class LioRelay:
    """``relay_<image>`` (a linear view of the cached device) exported by LIO."""

    def __init__(self, driver: DmDriver) -> None:
        self.d = driver

    def _view(self, image: str, cached: layer.Device) -> str:
        n = ImageNames(image)
        table = Table.of(Linear(length=cached.size // 512, device=cached.path))
        return self.d.dm.create(n.relay, table, uuid=n.uuid("relay"))

    def ensure(self, spec: layer.RelaySpec) -> layer.Relay:
        image, iqn, cached = spec.image, spec.iqn, spec.origin
        with adopting(image):  # a view over another device, or a target of that IQN elsewhere
            view = self._view(image, cached)
            with self.d.lock:
                self._export(iqn, view)
        nbd = None
        if self.d.nbd is not None and not self.d.nbd.draining:
            nbd = self.d.nbd.export(image, cached.path)
        return layer.Relay(
            name=ImageNames(image).relay,
            path=view,
            size=cached.size,
            iqn=iqn,
            portal=self.d.portal,
            nbd=nbd,
        )

    def inspect(self, image: str) -> layer.Relay | None:
        n = ImageNames(image)
        if not self.d.is_ours(n.relay, "relay", image):
            return None
        exports = self._exports(image, None)
        if not exports:
            return None
        path = n.path(n.relay)
        nbd = None
        if self.d.nbd is not None and self.d.nbd.exported(image):
            nbd = self.d.nbd.address
        return layer.Relay(
            name=n.relay,
            path=path,
            size=self.d.dm.size(path) * 512,
            iqn=exports[0],
            portal=self.d.portal,
            nbd=nbd,
        )

    def list_owned(self) -> builtins.list[str]:
        """Images with a relay view or an export of one."""
        return sorted(set(self.images()) | set(self.d.owned("relay")))

    def _export(self, iqn: str, view: str) -> None:
        self.d.lio.export(iqn, view, chap=self.d.chap, portals=[self.d.portal], lun=1)

    def readers(self, image: str, iqn: str) -> int:
        """Sessions on the image's target, plus NBD clients of this node (if it exports
        NBD: they cannot be told apart by image, so they count for every image)."""
        return self._sessions(iqn) + (self.d.nbd.clients() if self.d.nbd is not None else 0)

    def _sessions(self, iqn: str) -> int:
        return len(self.d.lio.sessions(iqn))

    def _exports(self, image: str, iqn: str | None) -> list[str]:
        view = ImageNames(image).relay
        return [
            e.iqn for e in self.d.lio.list() if e.iqn == iqn or e.device == f"/dev/mapper/{view}"
        ]

    def teardown(self, image: str, iqn: str | None = None, *, force: bool = False) -> None:
        """LIO drops the sessions of a target it removes: ``force`` changes nothing here."""
        self._unexport_nbd(image)
        n = ImageNames(image)
        with self.d.lock:
            for target in self._exports(image, iqn):
                self.d.lio.remove(target)
            self.d.remove(n.relay, "relay", image)

    def _unexport_nbd(self, image: str) -> None:
        """First of a teardown: the NBD export holds the cached device open."""
        if self.d.nbd is not None:
            self.d.nbd.unexport(image)

    def images(self) -> builtins.list[str]:
        prefix = "/dev/mapper/relay_"
        return [e.device[len(prefix) :] for e in self.d.lio.list() if e.device.startswith(prefix)]

    def sweep(self, keep: set[str]) -> None:
        views = {f"/dev/mapper/{ImageNames(i).relay}" for i in keep}
        with self.d.lock:
            for export in self.d.lio.list():
                if export.device not in views:
                    LOG.warning("removing stray LIO target %s", export.iqn)
                    self.d.lio.remove(export.iqn)


class TgtRelay(LioRelay):
    """The same linear view exported by tgtd (``dm_relay = tgt``)."""

    def _export(self, iqn: str, view: str) -> None:
        self.d.tgt.create_target(iqn, Path(view), lun=1, readonly=True, chap=self.d.chap)

    def _sessions(self, iqn: str) -> int:
        return len(self.d.tgt.connections(iqn))

    def _exports(self, image: str, iqn: str | None) -> list[str]:
        view = f"/dev/mapper/{ImageNames(image).relay}"
        return [
            t.iqn
            for t in self.d.tgt.targets()
            if t.iqn == iqn or any(lun.backing_path == view for lun in t.luns)
        ]

    def teardown(self, image: str, iqn: str | None = None, *, force: bool = False) -> None:
        self._unexport_nbd(image)
        with self.d.lock:
            for target in self._exports(image, iqn):
                self.d.tgt.delete_target(target)
            self.d.remove(ImageNames(image).relay, "relay", image)

    def images(self) -> builtins.list[str]:
        prefix = "/dev/mapper/relay_"
        return [
            lun.backing_path[len(prefix) :]
            for t in self.d.tgt.targets()
            for lun in t.luns
            if lun.backing_path.startswith(prefix)
        ]

    def sweep(self, keep: set[str]) -> None:
        views = {f"/dev/mapper/{ImageNames(i).relay}" for i in keep}
        with self.d.lock:
            for t in self.d.tgt.targets():
                relays = [lun.backing_path for lun in t.luns if "/relay_" in lun.backing_path]
                if relays and not set(relays) & views:
                    LOG.warning("removing stray tgt relay %s", t.iqn)
                    self.d.tgt.delete_target(t.iqn)


class DmSnapshot:
    """``snapshot_<instance>``: a persistent dm snapshot of the cached device, its COW a
    sparse file ``instances_dir/<instance>.cow`` on a loop device."""

    def __init__(self, driver: DmDriver) -> None:
        self.d = driver

    def _file(self, instance: str) -> Path:
        return self.d.settings.instances_dir / f"{instance}.cow"

    def inspect(self, instance: str) -> layer.Device | None:
        name = snapshot_name(instance)
        if not self.d.is_ours(name, SNAPSHOT, instance):
            return None
        path = f"/dev/mapper/{name}"
        return layer.Device(name, path, self.d.dm.size(path) * 512)

    def ensure(self, spec: layer.SnapshotSpec) -> layer.Device:
        d = self.d
        instance, origin = spec.instance, spec.origin
        name = snapshot_name(instance)
        cow = self._file(instance)
        if d.is_ours(name, SNAPSHOT, instance):  # adopted if identical; never replaced
            live = d.dm.table(name)
            want = (d.host.devno(origin.path), origin.size // 512)
            if (
                len(live) != 1
                or live[0].type != "snapshot"
                or (
                    live[0].args[0] if live[0].args else None,
                    live[0].length,
                )
                != want
            ):
                raise Conflict(instance, f"{name} is not a snapshot of {origin.path}")
            return layer.Device(name, f"/dev/mapper/{name}", origin.size)
        if cow.exists():  # an earlier run's disk (e.g. before a reboot): never overwritten
            raise DiskExists(instance)
        for stale in d.loops.find(str(cow)):  # a create that died half way
            d.loops.detach(stale)
        size = origin.size * d.settings.dm_cow_percent // 100 + (8 << 20)
        cow.parent.mkdir(parents=True, exist_ok=True)
        with open(cow, "wb") as f:  # a new, all-zero COW: a fresh snapshot store
            os.fchmod(f.fileno(), FILE_MODE)
            f.truncate(size)
        loop = None
        try:
            loop = d.loops.attach(str(cow))
            table = Table.of(
                Snapshot(length=origin.size // 512, origin=origin.path, cow=loop, persistent=True)
            )
            path = d.dm.create(name, table, uuid=uuid_of(SNAPSHOT, instance))
            return layer.Device(name, path, origin.size)
        except BaseException:
            if loop is not None:
                d.loops.detach(loop)
            cow.unlink(missing_ok=True)
            raise

    def teardown(self, instance: str) -> None:
        d = self.d
        d.remove(snapshot_name(instance), SNAPSHOT, instance)
        cow = self._file(instance)
        for loop in d.loops.find(str(cow)):
            d.loops.detach(loop)
        cow.unlink(missing_ok=True)

    def list_owned(self) -> list[str]:
        return self.d.owned(SNAPSHOT)
