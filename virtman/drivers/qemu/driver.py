"""The userspace driver: one qemu-storage-daemon and one tgtd per node.

Per image::

    paths (iscsi / nbd nodes) -> quorum (fifo: the first working path carries the reads)
      -> qcow2 cache file (backing = the quorum) -> copy-on-read filter
      -> FUSE export (a raw file: the origin) -> tgtd LUN 1 read-only (the relay), + NBD export
    per VM: a qcow2 overlay file whose backing is the FUSE file

NBD paths fail over by themselves (``reconnect-delay``); an iSCSI path that dies with a read
on it hangs that read in QEMU, so peers are read over NBD whenever they offer it, and iSCSI
is used for image servers (and parents without NBD, e.g. ``dm`` nodes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

from brick import psk, tcpinfo, values
from brick.exception import BrickError, PathsUnavailable
from brick.executor import execute
from brick.fileio import FILE_MODE, fsync_dir, private_dir
from brick.proc import established_connections
from brick.qsd.daemon import StorageDaemon
from brick.tgt import Chap, TgtAdm, TgtDaemon
from virtman import stack
from virtman.conf import Settings
from virtman.drivers.qemu.names import NODE, ImageNames, image_tag
from virtman.errors import Conflict, adopting
from virtman.layers import base as layer
from virtman.layers.pathsfile import PathsFiles

LOG = logging.getLogger(__name__)

QUORUM_REPORT_BAD = "QUORUM_REPORT_BAD"
PSK_SERVER = "vmt-nbd-psk-server"  # the NBD server's tls-creds-psk object


def psk_client_id(identity: str) -> str:
    """The tls-creds-psk object NBD paths present: one per identity, so that a key rotated
    to a new identity gets a new object while paths made before keep the old one."""
    return "vmt-nbd-psk-c" + hashlib.sha256(identity.encode()).hexdigest()[:12]


def _split(address: str) -> tuple[str, int]:
    where = values.Portal.parse(address, names=True)
    return where.host, where.port


def _peer(endpoint: layer.Endpoint) -> tcpinfo.Peer | None:
    """The (address, port) a path's socket is connected to: NBD when the endpoint offers
    it (``QemuUpstream._connect``), else its iSCSI portal; None for a host name."""
    host, port = _split(endpoint.nbd or endpoint.portal)
    address = tcpinfo.canonical(host)
    return (address, port) if address is not None else None


class QemuDriver:
    name = "qemu"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host = settings.host_ip
        for d in (settings.cache_dir, settings.instances_dir, settings.run_dir):
            private_dir(d)
        for sub in ("exports", "paths"):
            private_dir(settings.run_dir / sub)
        self.qsd = StorageDaemon(
            "virtman-qsd",
            settings.run_dir,
            malloc_mmap_threshold_kib=settings.qemu_malloc_mmap_threshold_kib or None,
        )
        self.tgtd = TgtDaemon(
            settings.tgt_control_port,
            [values.join_host_port(self.host, settings.iscsi_port)],
            run_dir=settings.run_dir,
        )
        self.tgt = TgtAdm(settings.tgt_control_port)
        self._daemons = threading.Lock()  # start, revive and stop of the two daemons
        self._lost = layer.Revived()  # what died with a daemon whose restart has not succeeded
        self.chap = (
            Chap(settings.chap_user, settings.chap_password)
            if settings.chap_user and settings.chap_password
            else None
        )
        self.nbd_tls: str | None = None  # the client credentials NBD paths present
        self.psk_dir = settings.run_dir / "nbd-psk"  # QEMU's copy of nbd_psk_file
        self.paths = PathsFiles(settings.run_dir)
        self.upstream = QemuUpstream(self)
        self.cache = QemuCache(self)
        self.relay = QemuRelay(self)
        self.snapshot = QemuSnapshot(self)

    def names(self, image: str) -> ImageNames:
        return ImageNames(image, cache_dir=self.settings.cache_dir, run_dir=self.settings.run_dir)

    # -- daemons ---------------------------------------------------------------------------
    def start(self) -> None:
        with self._daemons:
            if not self.qsd.adopt():
                self.qsd.start()
            if not self.tgtd.adopt():
                self.tgtd.start()
            self._start_nbd()

    def revive(self) -> layer.Revived:
        """qemu-storage-daemon holds every stack (its FUSE origins are what the relays
        export and the VMs' overlays are backed by); tgtd holds every target. What a daemon
        took with it is reported once that daemon serves again (a failed start is retried
        at the next call, and reported then)."""
        with self._daemons:
            if not self.qsd.running():
                if not self._lost.stacks:
                    LOG.error(
                        "qemu-storage-daemon %s died: starting it again; every image stack "
                        "is rebuilt from its cache file (VMs with the old origin open see "
                        "I/O errors until they are restarted)",
                        self.qsd.name,
                    )
                self._lost = layer.Revived(stacks=True, targets=self._lost.targets)
            if self._lost.stacks:
                self.qsd.start()  # unmounts the dead FUSE origins first
                self._start_nbd()
            if not self.tgtd.alive():
                if not self._lost.targets:
                    LOG.error(
                        "tgtd (control port %d) died: starting it again; every target is "
                        "exported again",
                        self.tgtd.control_port,
                    )
                self._lost = layer.Revived(stacks=self._lost.stacks, targets=True)
            if self._lost.targets:
                self.tgtd.start()
            lost, self._lost = self._lost, layer.Revived()
            return lost

    def _start_nbd(self) -> None:
        """The NBD credentials (adopted after a restart) and the NBD server, with TLS when
        ``nbd_psk_file`` is set; what this call added is removed if the server fails."""
        s = self.settings
        added: list[str] = []
        server_creds = None
        try:
            if s.nbd_psk_file is not None:
                directory, identity = psk.install(s.nbd_psk_file, self.psk_dir)
                client = psk_client_id(identity)
                if self.qsd.add_tls_psk(client, directory, endpoint="client", username=identity):
                    added.append(client)
                self.nbd_tls = client
                if s.nbd_port:
                    if self.qsd.add_tls_psk(PSK_SERVER, directory, endpoint="server"):
                        added.append(PSK_SERVER)
                    server_creds = PSK_SERVER
            if s.nbd_port:
                # a daemon adopted from before the key (or with another) serves its exports
                # again once their images are adopted (relay.ensure)
                self.qsd.stop_nbd_server_unless_tls(server_creds)
                self.qsd.start_nbd_server(self.host, s.nbd_port, tls_creds=server_creds)
        except BaseException:
            for obj in added:
                try:
                    self.qsd.delete_object(obj)
                except BrickError as exc:
                    LOG.warning("could not remove TLS credentials %s: %s", obj, exc)
            raise

    def stop(self) -> None:
        """Stop qemu-storage-daemon (and drop its copy of the NBD key), and tgtd unless it
        still exports image targets."""
        with self._daemons:
            self.qsd.stop()
            psk.uninstall(self.psk_dir)
            if not self.tgt.targets():
                self.tgtd.stop()

    def halt(self) -> None:
        """tgtd through tgtadm (it ignores SIGTERM), then qemu-storage-daemon: its FUSE
        origins are unmounted once it is gone. A failed tgtd stop still stops the other."""
        with self._daemons:
            try:
                self.tgtd.stop()
            finally:
                self.qsd.stop()
                psk.uninstall(self.psk_dir)

    # -- what exists -----------------------------------------------------------------------
    def images(self) -> set[str]:
        return stack.images(self)

    def origin(self, image: str) -> layer.Device | None:
        return self.cache.inspect(image)

    def cached_extents(self, image: str) -> list[tuple[int, int]]:
        """The extents of ``image`` its qcow2 cache holds, ``(offset, length)``, as
        ``qemu-img map -U`` reads them from the file under the running daemon. The qcow2
        metadata the daemon has not written back yet is missing, so the answer can only
        be short of the truth, never beyond it: what the prefetch skips is cached."""
        path = self.names(image).cache_file
        out = execute(
            ["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", str(path)], timeout_s=30
        ).stdout
        return [
            (int(e["start"]), int(e["length"]))
            for e in json.loads(out)
            if e.get("present", e.get("data")) and e.get("depth", 0) == 0
        ]

    def sweep(self, keep: set[str]) -> None:
        """Remove every node and export of ours that belongs to no image in ``keep``."""
        tags = {image_tag(i) for i in keep}
        for export in self.qsd.exports():
            m = NODE.fullmatch(export.id)
            if m and m.group(1) not in tags:
                LOG.warning("removing stray export %s", export.id)
                self.qsd.delete_export(export.id)
        for _ in range(4):  # parents before children: repeat until nothing more goes
            stray = [
                n for n in self.qsd.nodes() if (m := NODE.fullmatch(n)) and m.group(1) not in tags
            ]
            if not stray:
                break
            for node in stray:
                try:
                    self.qsd.delete_node(node)
                except BrickError:
                    continue


# A heartbeat reads every image's counters at once: one ``ss`` run serves them all.
SOCKETS_TTL_S = 1.0
_clock = time.monotonic  # the tests' to replace


class QemuUpstream:
    def __init__(self, driver: QemuDriver) -> None:
        self.d = driver
        self._sockets_lock = threading.Lock()
        self._sockets: tuple[float, int, dict[tcpinfo.Peer, list[int]]] = (0.0, 0, {})
        self._bad: set[str] = set()  # path nodes with a failed read not asked for yet
        self._bad_lock = threading.Lock()

    def ensure(self, spec: layer.UpstreamSpec) -> layer.Device:
        image, endpoints = spec.image, spec.endpoints
        n = self.d.names(image)
        qsd = self.d.qsd
        present = qsd.nodes()
        current = self.endpoints(image)
        wanted: list[layer.Endpoint] = []
        for endpoint in endpoints:
            node = n.path(endpoint)
            if node not in present:
                try:
                    self._connect(node, endpoint, image)
                except BrickError as exc:
                    LOG.warning("%s: path %s unusable: %s", image, endpoint.key, exc)
                    continue
            wanted.append(endpoint)
        if not wanted:
            raise PathsUnavailable(image, [e.key for e in endpoints])
        if n.quorum not in present:
            qsd.add_quorum(n.quorum, [n.path(e) for e in wanted])
        else:
            self._reorder(n, current, wanted)
        self.d.paths.save(image, wanted)
        for endpoint in current:
            if endpoint.key not in {e.key for e in wanted}:
                self._disconnect(n.path(endpoint))
        return layer.Device(n.quorum, "", qsd.node_size(n.quorum))

    def _reorder(
        self, n: ImageNames, current: list[layer.Endpoint], wanted: list[layer.Endpoint]
    ) -> None:
        """Make the quorum's children ``wanted`` in order: add first, then drop, so that a
        path always remains (x-blockdev-change appends; fifo reads the first child)."""
        qsd = self.d.qsd
        children = [n.path(e) for e in current]
        goal = [n.path(e) for e in wanted]
        for node in goal:
            if node not in children:
                qsd.quorum_add_child(n.quorum, node)
                children.append(node)
        while children[: len(goal)] != goal:
            head = children.pop(0)
            qsd.quorum_remove_child(n.quorum, head)
            if head in goal:
                qsd.quorum_add_child(n.quorum, head)
                children.append(head)
        for node in children[len(goal) :]:
            qsd.quorum_remove_child(n.quorum, node)

    def _connect(self, node: str, endpoint: layer.Endpoint, image: str) -> None:
        qsd = self.d.qsd
        if endpoint.nbd:
            host, port = _split(endpoint.nbd)
            qsd.add_nbd(
                node,
                host,
                port,
                image,
                reconnect_delay=self.d.settings.nbd_reconnect_delay,
                tls_creds=self.d.nbd_tls,
            )
            return
        chap = self.d.chap
        qsd.add_iscsi(
            node,
            endpoint.portal,
            endpoint.iqn,
            endpoint.lun,
            user=chap.user if chap else None,
            password=chap.password if chap else None,
            initiator_name=f"iqn.2010-10.org.vmthunder:{self.d.host.replace(':', '-')}",
        )

    def _disconnect(self, node: str) -> None:
        try:
            self.d.qsd.delete_node(node)
        except BrickError as exc:
            LOG.warning("could not remove path node %s: %s", node, exc)

    def endpoints(self, image: str) -> list[layer.Endpoint]:
        return self.d.paths.load(image)

    def failed_paths(self, image: str) -> list[layer.Endpoint]:
        """The paths of ``image`` whose reads failed since the last call: the quorum's
        ``QUORUM_REPORT_BAD`` events (fifo: a child's failed read, before the next child
        serves it) name the path node. Events of other images wait for their call."""
        try:
            events = self.d.qsd.qmp.events(QUORUM_REPORT_BAD)
        except BrickError:
            events = []
        with self._bad_lock:
            for event in events:
                node = (event.get("data") or {}).get("node-name")
                if isinstance(node, str):
                    self._bad.add(node)
            n = self.d.names(image)
            failed = [e for e in self.endpoints(image) if n.path(e) in self._bad]
            self._bad -= {n.path(e) for e in failed}
            if self._bad:  # forget the paths no image has any more
                images = self.d.paths.images()
                self._bad &= {self.d.names(i).path(e) for i in images for e in self.endpoints(i)}
        return failed

    def read_counters(self, image: str) -> dict[layer.Endpoint, int]:
        """Bytes received on each path's TCP connection (``brick.tcpinfo``): QEMU accounts
        reads per BlockBackend only, and a path is a bare node under the quorum, with no
        ``rd_bytes`` of its own. A peer address that another of this node's paths also
        uses (two images from one parent) cannot be told apart by socket: not counted."""
        pid = self.d.qsd.pid
        if pid is None:
            return {}
        peers = {e: _peer(e) for e in self.endpoints(image)}
        shared = Counter(_peer(e) for other in self.d.paths.images() for e in self.endpoints(other))
        sockets = self._received(pid)
        return {
            e: sum(sockets[peer])
            for e, peer in peers.items()
            if peer is not None and shared[peer] == 1 and peer in sockets
        }

    def _received(self, pid: int) -> dict[tcpinfo.Peer, list[int]]:
        """``tcpinfo.received(pid)``, taken at most once per SOCKETS_TTL_S."""
        with self._sockets_lock:
            at, of, sockets = self._sockets
            now = _clock()
            if of != pid or now - at >= SOCKETS_TTL_S:
                sockets = tcpinfo.received(pid)
                self._sockets = (now, pid, sockets)
            return sockets

    def inspect(self, image: str) -> layer.Device | None:
        n = self.d.names(image)
        if n.quorum not in self.d.qsd.nodes():
            return None
        return layer.Device(n.quorum, "", self.d.qsd.node_size(n.quorum))

    def list_owned(self) -> list[str]:
        """Images with a paths file (the quorum's node name is a hash of the image's)."""
        return sorted(self.d.paths.images())

    def teardown(self, image: str) -> None:
        n = self.d.names(image)
        present = self.d.qsd.nodes()
        if n.quorum in present:
            self.d.qsd.delete_node(n.quorum)
        for node in present:
            if node.startswith(n.quorum[:-1] + "p"):
                self.d.qsd.delete_node(node)
        self.d.paths.remove(image)


class QemuCache:
    def __init__(self, driver: QemuDriver) -> None:
        self.d = driver

    def ensure(self, spec: layer.CacheSpec) -> layer.Device:
        image, upstream = spec.image, spec.upstream
        n = self.d.names(image)
        qsd = self.d.qsd
        present = qsd.nodes()
        if n.cache in present and (size := qsd.node_size(n.cache)) != upstream.size:
            raise Conflict(image, f"its cache {n.cache} holds {size} bytes, not {upstream.size}")
        if n.cache not in present:
            qsd.add_qcow2_cache(n.cache, n.cache_file, upstream.name, upstream.size)
            os.chmod(n.cache_file, FILE_MODE)  # the image's bytes: not for other users
        if n.cor not in present:
            qsd.add_copy_on_read(n.cor, n.cache)
        if n.fuse_export not in {e.id for e in qsd.exports()}:
            qsd.export_fuse(
                n.fuse_export,
                n.cor,
                n.fuse_file,
                readahead_kib=self.d.settings.qemu_fuse_readahead_kib or None,
            )
        return layer.Device(n.cor, str(n.fuse_file), upstream.size)

    def inspect(self, image: str) -> layer.Device | None:
        n = self.d.names(image)
        exports = {e.id for e in self.d.qsd.exports()}
        if n.fuse_export not in exports or n.cor not in self.d.qsd.nodes():
            return None
        return layer.Device(n.cor, str(n.fuse_file), self.d.qsd.node_size(n.cor))

    def list_owned(self) -> list[str]:
        return sorted(p.stem for p in self.d.settings.cache_dir.glob("*.qcow2"))

    def teardown(self, image: str, *, keep_file: bool = False) -> None:
        n = self.d.names(image)
        qsd = self.d.qsd
        if n.fuse_export in {e.id for e in qsd.exports()}:
            qsd.delete_export(n.fuse_export)
        present = qsd.nodes()
        for node in (n.cor, n.cache):
            if node in present:
                qsd.delete_node(node)
        n.fuse_file.unlink(missing_ok=True)
        if not keep_file:
            n.cache_file.unlink(missing_ok=True)


class QemuRelay:
    def __init__(self, driver: QemuDriver) -> None:
        self.d = driver

    def ensure(self, spec: layer.RelaySpec) -> layer.Relay:
        image, iqn, cached = spec.image, spec.iqn, spec.origin
        n = self.d.names(image)
        with adopting(image):  # a target of that IQN over another file
            self.d.tgt.create_target(iqn, Path(cached.path), lun=1, readonly=True, chap=self.d.chap)
        if self.d.settings.nbd_port and n.nbd_export not in {e.id for e in self.d.qsd.exports()}:
            self.d.qsd.export_nbd(n.nbd_export, cached.name, image)
        return self._relay(image, iqn, cached)

    def _relay(self, image: str, iqn: str, cached: layer.Device) -> layer.Relay:
        s = self.d.settings
        nbd = f"{_host(self.d.host)}:{s.nbd_port}" if s.nbd_port else None
        portal = f"{_host(self.d.host)}:{s.iscsi_port}"
        return layer.Relay(
            name=image, path=cached.path, size=cached.size, iqn=iqn, portal=portal, nbd=nbd
        )

    def inspect(self, image: str) -> layer.Relay | None:
        fuse = str(self.d.names(image).fuse_file)
        for target in self.d.tgt.targets():
            for lun in target.luns:
                if lun.backing_path == fuse:
                    origin = self.d.cache.inspect(image)
                    size = origin.size if origin is not None else 0
                    return self._relay(image, target.iqn, layer.Device(image, fuse, size))
        return None

    def list_owned(self) -> list[str]:
        """Images whose origin file some target exports."""
        exports = self.d.settings.run_dir / "exports"
        return sorted(
            Path(lun.backing_path).stem
            for t in self.d.tgt.targets()
            for lun in t.luns
            if Path(lun.backing_path).parent == exports and lun.backing_path.endswith(".raw")
        )

    def readers(self, image: str, iqn: str) -> int:
        """iSCSI sessions on the image's target, plus NBD clients of this node (NBD
        connections cannot be told apart by export, so they count for every image)."""
        n = self.d.names(image)
        count = len(self.d.tgt.connections(iqn))
        if n.nbd_export in {e.id for e in self.d.qsd.exports()}:
            count += established_connections(self.d.settings.nbd_port)
        return count

    def teardown(self, image: str, iqn: str | None = None, *, force: bool = False) -> None:
        n = self.d.names(image)
        if n.nbd_export in {e.id for e in self.d.qsd.exports()}:
            self.d.qsd.delete_export(n.nbd_export, force=force)
        for target in self.d.tgt.targets():
            if target.iqn == iqn or any(
                lun.backing_path == str(n.fuse_file) for lun in target.luns
            ):
                self.d.tgt.delete_target(target.iqn)


class QemuSnapshot:
    def __init__(self, driver: QemuDriver) -> None:
        self.d = driver

    def _file(self, instance: str) -> Path:
        return self.d.settings.instances_dir / f"{instance}.qcow2"

    def _info(self, path: Path) -> dict[str, object] | None:
        """``qemu-img info`` of a disk (shared: a VM may have it open); None if unreadable."""
        try:
            out = execute(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout
            info = json.loads(out)
        except (BrickError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def inspect(self, instance: str) -> layer.Device | None:
        path = self._file(instance)
        if not path.exists():
            return None
        info = self._info(path) or {}
        size = info.get("virtual-size")
        return layer.Device(instance, str(path), size if isinstance(size, int) else 0)

    def ensure(self, spec: layer.SnapshotSpec) -> layer.Device:
        instance, origin = spec.instance, spec.origin
        path = self._file(instance)
        if path.exists():  # adopted if identical; never overwritten
            info = self._info(path) or {}
            backing = info.get("backing-filename") or info.get("full-backing-filename")
            size = info.get("virtual-size")
            if backing != origin.path or size != origin.size or info.get("format") != "qcow2":
                raise Conflict(
                    instance,
                    f"its disk {path} is not an overlay of {origin.path} "
                    f"(backing {backing!r}, {size} bytes)",
                )
            return layer.Device(instance, str(path), origin.size)
        tmp = path.with_suffix(".part")
        execute(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", origin.path, str(tmp)]
        )
        os.chmod(tmp, FILE_MODE)  # the VM's writes: its owner's only
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return layer.Device(instance, str(path), origin.size)

    def teardown(self, instance: str) -> None:
        self._file(instance).unlink(missing_ok=True)
        self._file(instance).with_suffix(".part").unlink(missing_ok=True)

    def list_owned(self) -> list[str]:
        return sorted(p.stem for p in self.d.settings.instances_dir.glob("*.qcow2"))


def _host(address: str) -> str:
    return values.bracket(address)
