"""NBD exports of a ``dm`` node's relays, for children on the ``qemu`` driver.

A ``qemu`` child reads its parents through qemu-storage-daemon. Over iSCSI (libiscsi) a
read on a parent that dies hangs, because libiscsi reconnects forever; over NBD the path
gives up after ``nbd_reconnect_delay`` and the quorum reads the next parent. So with
``dm_nbd_relay`` a ``dm`` node runs one qemu-storage-daemon (``virtman-dm-nbd``) that
exports each image's cached device (``/dev/mapper/cached_<image>``, read-only) as NBD
export ``<image>`` on ``host_ip:nbd_port`` (TLS with the ``nbd_psk_file`` key), next to
the LIO (or tgt) target, and Volt hands children both addresses. ``dm`` children keep
reading over iSCSI.

The daemon outlives virtman like the kernel's targets do: a restarted virtman adopts it
(its exports are still there), and it is stopped only once it exports nothing. If it dies,
the driver's monitor starts it again and exports every relay again (``heal``); meanwhile
the children read their other parents.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping

from brick import psk, values
from brick.exception import BrickError
from brick.proc import established_connections
from brick.qsd.daemon import StorageDaemon
from virtman import validation
from virtman.conf import Settings

LOG = logging.getLogger(__name__)

DAEMON = "virtman-dm-nbd"
PREFIX = "vmtdm"  # every node and export of ours; QMP names allow 32 of [A-Za-z0-9_-]
PSK_SERVER = "vmtdm-psk-server"  # tls-creds-psk of the NBD server (with nbd_psk_file)


def _tag(image: str) -> str:
    """The image's block node (its export is ``_export_id``)."""
    return PREFIX + hashlib.sha256(image.encode()).hexdigest()[:12]


def _export_id(image: str) -> str:
    return _tag(image) + "x"


class NbdRelay:
    """The NBD side of the relays (see the module docstring)."""

    def __init__(
        self, settings: Settings, daemon: StorageDaemon | None = None, *, draining: bool = False
    ) -> None:
        if not settings.nbd_port and not draining:
            raise ValueError("dm_nbd_relay needs nbd_port (0 means no NBD exports)")
        self.host = settings.host_ip
        self.port = settings.nbd_port
        self.address = values.join_host_port(self.host, self.port)
        self.qsd = daemon or StorageDaemon(DAEMON, settings.run_dir)
        self.draining = draining  # exports nothing new, stops once its exports are gone
        self.psk_file = settings.nbd_psk_file
        self.psk_dir = settings.run_dir / "nbd-psk"
        self._lock = threading.RLock()  # heal() against export()/unexport()

    @classmethod
    def leftover(cls, settings: Settings, daemon: StorageDaemon | None = None) -> NbdRelay | None:
        """With ``dm_nbd_relay`` off: the daemon an earlier run left, adopted to drain (its
        exports hold cached devices, and children read them), or None."""
        qsd = daemon or StorageDaemon(DAEMON, settings.run_dir)
        if not qsd.adopt():
            return None
        LOG.warning(
            "dm_nbd_relay is off but %s still runs: its exports stay until their relays go",
            DAEMON,
        )
        relay = cls(settings, qsd, draining=True)
        if qsd.nbd_server:
            relay.address = qsd.nbd_server
            relay.port = values.Portal.parse(qsd.nbd_server, names=True).port
        relay.stop_if_idle()
        return relay

    def start(self) -> None:
        """Start or adopt the daemon and its NBD server: with ``nbd_psk_file``, clients
        must complete TLS with its key (the credentials are adopted after a restart and
        removed again if the server fails to start)."""
        with self._lock:
            if not self.qsd.adopt():
                self.qsd.start()
            creds = None
            added = False
            try:
                if self.psk_file is not None:
                    directory, _ = psk.install(self.psk_file, self.psk_dir)
                    added = self.qsd.add_tls_psk(PSK_SERVER, directory, endpoint="server")
                    creds = PSK_SERVER
                # exported again as the relays are adopted (DmRelay.ensure)
                self.qsd.stop_nbd_server_unless_tls(creds)
                self.qsd.start_nbd_server(self.host, self.port, tls_creds=creds)
            except BaseException:
                if added:
                    try:
                        self.qsd.delete_object(PSK_SERVER)
                    except BrickError as exc:
                        LOG.warning("could not remove TLS credentials %s: %s", PSK_SERVER, exc)
                raise

    def heal(self, relays: Callable[[], Mapping[str, str]]) -> bool:
        """If the daemon died, start it again and export ``relays()`` (``{image: device}``,
        asked for only then) again; returns whether it had to."""
        with self._lock:
            if self.draining or self.qsd.running():
                return False
            LOG.warning("NBD relay daemon %s is gone: starting it again", DAEMON)
            self.qsd.detach()
            try:
                self.start()
            except BaseException:  # not half started (no NBD server): the next pass retries
                if self.qsd.running():
                    self.qsd.stop()
                raise
            for image, device in sorted(relays().items()):
                try:
                    self.export(image, device)
                except Exception as exc:  # the other images still get theirs
                    LOG.error("%s: NBD export failed again: %s", image, exc)
            return True

    def stop(self) -> None:
        """Stop the daemon if it exports nothing (or is dead: its files go); otherwise
        leave it to its children."""
        with self._lock:
            if not self.qsd.running() or not self._ours():
                self.qsd.stop()
                psk.uninstall(self.psk_dir)
            else:
                self.qsd.detach()

    def _ours(self) -> list[str]:
        return [e.id for e in self.qsd.exports() if e.id.startswith(PREFIX)]

    def export(self, image: str, device: str) -> str:
        """Export ``device`` (the image's cached device) as NBD export ``image``; returns
        the server's ``host:port``. Idempotent; a failed export leaves no node."""
        tag = _tag(validation.name(image, "image"))
        with self._lock:
            added = self.qsd.node_info(tag) is None
            self.qsd.add_host_device(tag, device, read_only=True)
            try:
                self.qsd.export_nbd(_export_id(image), tag, image)
            except BaseException:
                if added:
                    self.qsd.delete_node(tag)
                raise
        LOG.info("%s: NBD export of %s on %s", image, device, self.address)
        return self.address

    def unexport(self, image: str) -> None:
        """Drop the export (and its clients: they fail over) and its node; idempotent. A
        dead daemon holds nothing: then there is nothing to drop."""
        tag = _tag(image)
        with self._lock:
            if not self.qsd.running():
                LOG.warning("%s: NBD relay daemon not running: no export to drop", image)
                return
            self.qsd.delete_export(_export_id(image), force=True)
            self.qsd.delete_node(tag)
            if self.draining:
                self.stop_if_idle()

    def stop_if_idle(self) -> None:
        """Stop a draining daemon that exports nothing any more."""
        with self._lock:
            if self.qsd.running() and not self._ours():
                LOG.info("NBD relay daemon %s exports nothing: stopping it", DAEMON)
                self.qsd.stop()
                psk.uninstall(self.psk_dir)

    def clients(self) -> int:
        """NBD connections to this node; they cannot be told apart by export."""
        return established_connections(self.port) if self._ours() else 0

    def exported(self, image: str) -> bool:
        return _export_id(image) in self._ours()

    def sweep(self, keep: set[str]) -> None:
        """Remove exports and nodes of ours that belong to no image in ``keep``."""
        with self._lock:
            for export in set(self._ours()) - {_export_id(i) for i in keep}:
                LOG.warning("removing stray NBD export %s", export)
                self.qsd.delete_export(export, force=True)
            for node in set(self.qsd.nodes()) - {_tag(i) for i in keep}:
                if node.startswith(PREFIX):
                    self.qsd.delete_node(node)
