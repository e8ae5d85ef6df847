"""Exports of a qemu-storage-daemon: TLS-PSK objects, its NBD server, NBD and FUSE exports
(with the FUSE mount's kernel readahead window)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import brick.privileged.sysfs
from brick import values
from brick.exception import BrickError, Conflict, InvalidArgument, NotFound
from brick.qsd.core import DaemonCore
from brick.qsd.mounts import mount_device, mounted_paths, remove_empty_file
from brick.qsd.qmp import QMPError
from brick.qsd.validate import (
    _CHAP_USER,
    _EXPORT_NAME,
    MAX_READAHEAD_KIB,
    _validate_int,
    validate_abs_path,
    validate_host,
    validate_node_name,
    validate_port,
)

LOG = logging.getLogger("brick.qsd.daemon")

_BDI_DIR = Path("/sys/class/bdi")


class ExportOps(DaemonCore):
    """The exports of the daemon (see ``StorageDaemon``)."""

    # -- exports -------------------------------------------------------------------------
    def add_tls_psk(
        self, obj_id: str, psk_dir: str | os.PathLike[str], *, endpoint: str, username: str = ""
    ) -> bool:
        """A ``tls-creds-psk`` object reading ``<psk_dir>/keys.psk`` (lines ``user:hexkey``).

        ``endpoint="server"`` accepts the identities of the file (an NBD server given it
        refuses clients without TLS or without one of its keys); ``endpoint="client"``
        presents ``username``'s key. Returns True if the object was added, False if it
        exists with these parameters (adopted after a restart); ``Conflict`` otherwise.
        A client reads its key when the object is made: a new key needs a new object.
        """
        obj_id = validate_node_name(obj_id, "obj_id")
        path = validate_abs_path(psk_dir, "psk_dir")
        if endpoint not in ("server", "client"):
            raise InvalidArgument("endpoint", endpoint, "must be server or client")
        if endpoint == "client" and not (
            isinstance(username, str) and _CHAP_USER.fullmatch(username)
        ):
            raise InvalidArgument("username", username, "must be 1-64 of A-Za-z0-9._:@-")
        if endpoint == "server" and username:
            raise InvalidArgument("username", username, "only a client presents a username")
        wanted = {"dir": path, "endpoint": endpoint, "username": username}
        with self._lock:
            if obj_id in self._objects():
                have = {
                    k: self.qmp.call("qom-get", {"path": f"/objects/{obj_id}", "property": k})
                    for k in wanted
                }
                if have != wanted:
                    raise Conflict("TLS credentials", obj_id, f"exist as {have}")
                return False
            arguments: dict[str, Any] = {
                "qom-type": "tls-creds-psk",
                "id": obj_id,
                "endpoint": endpoint,
                "dir": path,
            }
            if username:
                arguments["username"] = username
            self.qmp.call("object-add", arguments)
            LOG.info(
                "qemu-storage-daemon %s: TLS-PSK %s credentials %s", self.name, endpoint, obj_id
            )
            return True

    def delete_object(self, obj_id: str) -> None:
        """``object-del`` (e.g. TLS credentials nothing uses any more); no-op if absent."""
        obj_id = validate_node_name(obj_id, "obj_id")
        with self._lock:
            if obj_id in self._objects():
                self.qmp.call("object-del", {"id": obj_id})

    def start_nbd_server(self, host: str, port: int, *, tls_creds: str | None = None) -> None:
        """Start the daemon's NBD server on ``host:port``; no-op if it serves there already
        (with the same ``tls_creds``), ``Conflict`` if it serves elsewhere or otherwise.

        With ``tls_creds`` (a ``tls-creds-psk`` server object, see ``add_tls_psk``) every
        client must complete a TLS handshake with one of its keys before it can list or open
        an export; without, anyone who reaches the port reads every export.
        """
        host = validate_host(host)
        port = validate_port(port)
        if tls_creds is not None:
            tls_creds = validate_node_name(tls_creds, "tls_creds")
        address = values.join_host_port(host, port)  # [v6]:port, as Portal.parse reads it
        with self._lock:
            state = self._load_state()
            if state["nbd_server"] == address and state.get("nbd_tls") == tls_creds:
                return
            if state["nbd_server"] is not None:
                tls = state.get("nbd_tls") or "no TLS"
                raise Conflict(
                    "NBD server", self.name, f"listens on {state['nbd_server']} with {tls}"
                )
            arguments: dict[str, Any] = {
                "addr": {"type": "inet", "data": {"host": host, "port": str(port)}}
            }
            if tls_creds is not None:
                arguments["tls-creds"] = tls_creds
            try:
                self.qmp.call("nbd-server-start", arguments)
            except QMPError as exc:
                if "already running" in exc.desc:
                    raise Conflict("NBD server", self.name, "runs on an unknown address") from exc
                raise
            state["nbd_server"] = address
            state["nbd_tls"] = tls_creds
            self._save_state(state)
            LOG.info(
                "qemu-storage-daemon %s: NBD server on %s (%s)",
                self.name,
                address,
                f"TLS {tls_creds}" if tls_creds else "no TLS",
            )

    def stop_nbd_server(self) -> None:
        """Stop the NBD server (its exports go with it); no-op if none runs."""
        with self._lock:
            state = self._load_state()
            if state["nbd_server"] is None:
                return
            try:
                self.qmp.call("nbd-server-stop")
            except QMPError as exc:
                if "not running" not in exc.desc:
                    raise
            state["nbd_server"] = None
            state.pop("nbd_tls", None)
            state["exports"] = {k: v for k, v in state["exports"].items() if v["type"] != "nbd"}
            self._save_state(state)

    @property
    def nbd_server(self) -> str | None:
        """``host:port`` of the running NBD server, or None."""
        return self._load_state()["nbd_server"]

    def stop_nbd_server_unless_tls(self, tls_creds: str | None) -> bool:
        """Stop the NBD server if it runs with other TLS credentials than ``tls_creds``
        (e.g. plain, started before a key was configured), so that ``start_nbd_server``
        starts it again with them. Its exports go with it (re-export them) and its clients
        are cut off. Returns whether it stopped one."""
        if tls_creds is not None:
            tls_creds = validate_node_name(tls_creds, "tls_creds")
        with self._lock:
            state = self._load_state()
            if state["nbd_server"] is None or state.get("nbd_tls") == tls_creds:
                return False
            LOG.warning(
                "qemu-storage-daemon %s: NBD server on %s runs with %s, not %s: restarting it",
                self.name,
                state["nbd_server"],
                state.get("nbd_tls") or "no TLS",
                tls_creds or "no TLS",
            )
            self.stop_nbd_server()
            return True

    def export_nbd(self, export_id: str, node: str, name: str, *, writable: bool = False) -> None:
        """Export ``node`` as NBD export ``name`` (``start_nbd_server`` first)."""
        export_id = validate_node_name(export_id, "export_id")
        node = validate_node_name(node)
        if not isinstance(name, str) or not _EXPORT_NAME.fullmatch(name):
            raise InvalidArgument("name", name, "must match [A-Za-z0-9][A-Za-z0-9._:-]*")
        if not isinstance(writable, bool):
            raise InvalidArgument("writable", writable, "must be a bool")
        wanted = {"type": "nbd", "node": node, "name": name, "writable": writable}
        with self._lock:
            state = self._load_state()
            if state["nbd_server"] is None:
                raise NotFound("NBD server of qemu-storage-daemon", self.name)
            if self._check_export(export_id, wanted, state):
                return
            self.qmp.call(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": export_id,
                    "node-name": node,
                    "name": name,
                    "writable": writable,
                },
            )
            state["exports"][export_id] = wanted
            self._save_state(state)
            LOG.info(
                "qemu-storage-daemon %s: exported %s as nbd://%s/%s",
                self.name,
                node,
                state["nbd_server"],
                name,
            )

    def _check_export(self, export_id: str, wanted: dict[str, Any], state: dict[str, Any]) -> bool:
        """True if ``export_id`` exists as wanted; ``Conflict`` if it exists otherwise."""
        have = self._export(export_id)
        if have is None:
            return False
        recorded = state["exports"].get(export_id, {})
        keys = [k for k in wanted if k != "created"]
        if (
            have.type != wanted["type"]
            or have.node != wanted["node"]
            or any(recorded.get(k) != wanted[k] for k in keys)
        ):
            raise Conflict("block export", export_id, f"exists as {have.type} of {have.node}")
        return True

    def export_fuse(
        self,
        export_id: str,
        node: str,
        mountpoint: str | os.PathLike[str],
        *,
        mode: int | None = None,
        readahead_kib: int | None = None,
    ) -> None:
        """Export ``node`` read-only as the regular file ``mountpoint`` (created if needed).

        QEMU mounts it ``allow_other`` with mode 0400 owned by the daemon's user; ``mode``
        (e.g. 0o444 for a libvirt guest running as another user) is applied with chmod after
        the mount and lasts until unmount. ``readahead_kib`` sets the mount's kernel
        readahead window (``set_readahead``); None leaves the kernel's default. An export
        that exists already gets the window too.
        """
        export_id = validate_node_name(export_id, "export_id")
        node = validate_node_name(node)
        path = validate_abs_path(mountpoint, "mountpoint")
        # /proc/mounts shows the resolved path; resolve the directory only (never stat a
        # FUSE mountpoint: a stuck daemon would hang us)
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if mode is not None:
            mode = _validate_int(mode, "mode", 0, 0o777)
            if mode & 0o222:
                raise InvalidArgument(
                    "mode", oct(mode), "must not grant write: the export is read-only"
                )
        if readahead_kib is not None:
            readahead_kib = _validate_int(readahead_kib, "readahead_kib", 0, MAX_READAHEAD_KIB)
        wanted = {"type": "fuse", "node": node, "mountpoint": path}
        with self._lock:
            state = self._load_state()
            if self._check_export(export_id, wanted, state):
                if readahead_kib is not None:
                    self.set_readahead(path, readahead_kib)
                return
            if path in mounted_paths():
                raise Conflict("mountpoint", path, "something is mounted there already")
            created = False
            if not os.path.exists(path):
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    created = True
            state["exports"][export_id] = {**wanted, "created": created}
            self._save_state(state)  # before the mount, so that stop() finds it after a crash
            try:
                self.qmp.call(
                    "block-export-add",
                    {
                        "type": "fuse",
                        "id": export_id,
                        "node-name": node,
                        "mountpoint": path,
                        "writable": False,
                    },
                )
                if mode is not None:
                    os.chmod(path, mode)
                if readahead_kib is not None:
                    self.set_readahead(path, readahead_kib)
            except BaseException:
                with contextlib.suppress(BrickError):
                    if self._export(export_id) is not None:
                        self.qmp.call("block-export-del", {"id": export_id})
                state["exports"].pop(export_id, None)
                self._save_state(state)
                if created and path not in mounted_paths():
                    remove_empty_file(path)
                raise
            LOG.info("qemu-storage-daemon %s: exported %s at %s", self.name, node, path)

    @staticmethod
    def readahead_path(mountpoint: str | os.PathLike[str]) -> Path:
        """The ``read_ahead_kb`` file of the mount at ``mountpoint``; ``NotFound`` if
        nothing is mounted there."""
        path = validate_abs_path(mountpoint, "mountpoint")
        device = mount_device(path)
        if device is None:
            raise NotFound("mount", path)
        return _BDI_DIR / device / "read_ahead_kb"

    def readahead(self, mountpoint: str | os.PathLike[str]) -> int:
        """The kernel readahead window (KiB) of the FUSE mount at ``mountpoint``."""
        return int(self.readahead_path(mountpoint).read_text().strip())

    def set_readahead(self, mountpoint: str | os.PathLike[str], kib: int) -> None:
        """Set the kernel readahead window of the (FUSE) mount at ``mountpoint`` to ``kib``
        KiB; it lasts until unmount. ``NotFound`` if nothing is mounted there."""
        kib = _validate_int(kib, "readahead_kib", 0, MAX_READAHEAD_KIB)
        target = self.readahead_path(mountpoint)
        try:
            brick.privileged.sysfs.write_knob(str(target), str(kib))
        except OSError as exc:
            raise BrickError(f"cannot set the readahead of {mountpoint}: {exc}") from exc
        LOG.info("qemu-storage-daemon %s: readahead of %s is %d KiB", self.name, mountpoint, kib)

    def delete_export(
        self, export_id: str, *, force: bool = False, timeout_s: float = 10.0
    ) -> None:
        """Remove an export and wait for ``BLOCK_EXPORT_DELETED``; no-op if absent. An NBD
        export with clients is refused by QEMU unless ``force`` (mode ``hard``: drop them).
        A FUSE mountpoint file this object created is removed."""
        export_id = validate_node_name(export_id, "export_id")
        with self._lock:
            state = self._load_state()
            if self._export(export_id) is not None:
                mark = self.qmp.event_mark()
                arguments: dict[str, Any] = {"id": export_id}
                if force:
                    arguments["mode"] = "hard"
                self.qmp.call("block-export-del", arguments)
                self.qmp.wait_event(
                    "BLOCK_EXPORT_DELETED",
                    lambda e: e.get("data", {}).get("id") == export_id,
                    timeout_s=timeout_s,
                    after=mark,
                )
                LOG.info("qemu-storage-daemon %s: deleted export %s", self.name, export_id)
            info = state["exports"].pop(export_id, None)
            if info is not None:
                if info.get("type") == "fuse" and info.get("created"):
                    if info["mountpoint"] in mounted_paths():
                        raise Conflict("mountpoint", info["mountpoint"], "still mounted")
                    remove_empty_file(info["mountpoint"])
                self._save_state(state)
