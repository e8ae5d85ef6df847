"""Block-node graph operations of a qemu-storage-daemon: file, host_device, NBD and iSCSI
nodes, a quorum over them, a qcow2 cache and a copy-on-read filter."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from brick import values
from brick.exception import BrickError, Conflict, InvalidArgument, NotFound
from brick.executor import execute
from brick.qsd.core import DaemonCore
from brick.qsd.validate import (
    _CHAP_USER,
    _EXPORT_NAME,
    _validate_int,
    validate_abs_path,
    validate_host,
    validate_iqn,
    validate_node_name,
    validate_port,
    validate_portal,
)

LOG = logging.getLogger("brick.qsd.daemon")


class GraphOps(DaemonCore):
    """The block nodes of the daemon (see ``StorageDaemon``)."""

    # -- nodes ---------------------------------------------------------------------------
    def _add_node(self, node: str, drv: str, same: bool | None, options: dict[str, Any]) -> bool:
        """blockdev-add unless ``node`` exists; True if it was added. ``same`` tells whether
        an existing node matches (None: no such node); a mismatch raises ``Conflict``."""
        if same is not None:
            if not same:
                raise Conflict("block node", node, f"exists with other parameters than {drv}")
            return False
        self.qmp.call("blockdev-add", {"driver": drv, "node-name": node, **options})
        LOG.info("qemu-storage-daemon %s: added %s node %s", self.name, drv, node)
        return True

    def add_file(self, node: str, path: str | os.PathLike[str], *, read_only: bool = True) -> None:
        """A ``file`` node on an existing file (e.g. the image an upstream exports)."""
        self._add_posix(node, "file", path, read_only)

    def add_host_device(
        self, node: str, path: str | os.PathLike[str], *, read_only: bool = True
    ) -> None:
        """A ``host_device`` node on a block device (QEMU's ``file`` driver refuses them)."""
        self._add_posix(node, "host_device", path, read_only)

    def _add_posix(
        self, node: str, drv: str, path: str | os.PathLike[str], read_only: bool
    ) -> None:
        node = validate_node_name(node)
        path = validate_abs_path(path, "path")
        if not isinstance(read_only, bool):
            raise InvalidArgument("read_only", read_only, "must be a bool")
        with self._lock:
            have = self.node_info(node)
            same = None if have is None else (
                have["drv"] == drv and have["file"] == path and have["ro"] == read_only
            )  # fmt: skip
            self._add_node(node, drv, same, {"filename": path, "read-only": read_only})

    def add_nbd(
        self,
        node: str,
        host: str,
        port: int,
        export: str,
        *,
        reconnect_delay: int = 3,
        tls_creds: str | None = None,
    ) -> None:
        """A read-only NBD client node of ``nbd://host:port/export``. ``reconnect_delay``
        (s): how long a request waits for a lost server before it fails, which lets a quorum
        above fail over to its next child. ``tls_creds``: a ``tls-creds-psk`` client object
        (``add_tls_psk``) whose key the server must accept."""
        node = validate_node_name(node)
        host = validate_host(host)
        port = validate_port(port)
        if not isinstance(export, str) or not _EXPORT_NAME.fullmatch(export):
            raise InvalidArgument("export", export, "must match [A-Za-z0-9][A-Za-z0-9._:-]*")
        reconnect_delay = _validate_int(reconnect_delay, "reconnect_delay", 0, 3600)
        if tls_creds is not None:
            tls_creds = validate_node_name(tls_creds, "tls_creds")
        shown_host = values.bracket(host)
        with self._lock:
            have = self.node_info(node)
            same = None if have is None else (
                have["drv"] == "nbd" and have["file"] == f"nbd://{shown_host}:{port}/{export}"
            )  # fmt: skip
            options: dict[str, Any] = {
                "server": {"type": "inet", "host": host, "port": str(port)},
                "export": export,
                "read-only": True,
                "reconnect-delay": reconnect_delay,
            }
            if tls_creds is not None:
                options["tls-creds"] = tls_creds
            self._add_node(node, "nbd", same, options)

    def add_iscsi(
        self,
        node: str,
        portal: str,
        iqn: str,
        lun: int,
        *,
        user: str | None = None,
        password: str | None = None,
        initiator_name: str | None = None,
    ) -> None:
        """A read-only iSCSI (libiscsi) node. The CHAP password goes into a QMP ``secret``
        object ``<node>-secret`` (never on a command line, never logged), deleted with the
        node by ``delete_node``."""
        node = validate_node_name(node)
        portal = validate_portal(portal)
        iqn = validate_iqn(iqn)
        lun = _validate_int(lun, "lun", 0, 16383)
        if (user is None) != (password is None):
            raise InvalidArgument("user", user, "CHAP needs both user and password")
        if user is not None and (not isinstance(user, str) or not _CHAP_USER.fullmatch(user)):
            raise InvalidArgument("user", user, "must be 1-64 of A-Za-z0-9._:@-")
        if password is not None and (
            not isinstance(password, str) or not 1 <= len(password) <= 255
        ):
            raise InvalidArgument("password", "***", "must be a string of 1-255 characters")
        if initiator_name is not None:
            initiator_name = validate_iqn(initiator_name, "initiator_name")
        secret = f"{node}-secret"
        with self._lock:
            have = self.node_info(node)
            if have is not None:
                text = str(have["file"])
                if have["drv"] != "iscsi" or iqn not in text or portal not in text:
                    raise Conflict("block node", node, f"exists as {have['drv']} {text}")
                return
            options: dict[str, Any] = {
                "transport": "tcp",
                "portal": portal,
                "target": iqn,
                "lun": lun,
                "read-only": True,
            }
            if initiator_name is not None:
                options["initiator-name"] = initiator_name
            if user is not None:
                if secret in self._objects():  # left by a failed attempt
                    self.qmp.call("object-del", {"id": secret})
                self.qmp.call("object-add", {"qom-type": "secret", "id": secret, "data": password})
                options["user"] = user
                options["password-secret"] = secret
            try:
                self._add_node(node, "iscsi", None, options)
            except BaseException:
                if user is not None:
                    with contextlib.suppress(BrickError):
                        self.qmp.call("object-del", {"id": secret})
                raise

    def add_quorum(self, node: str, children: Sequence[str]) -> None:
        """A read-only ``quorum`` over ``children`` with vote-threshold=1 and
        read-pattern=fifo: reads go to the first child that answers (the multipath layer)."""
        node = validate_node_name(node)
        if isinstance(children, str) or not children:
            raise InvalidArgument("children", children, "must be a non-empty list of nodes")
        kids = [validate_node_name(c, "children") for c in children]
        if len(set(kids)) != len(kids):
            raise InvalidArgument("children", children, "must not repeat a node")
        with self._lock:
            have = self.node_info(node)
            same = None
            if have is not None:
                same = have["drv"] == "quorum" and sorted(
                    self._quorum_children(node).values()
                ) == sorted(kids)
            options = {
                "children": kids,
                "vote-threshold": 1,
                "read-pattern": "fifo",
                "read-only": True,
            }
            self._add_node(node, "quorum", same, options)

    def _quorum_children(self, node: str) -> dict[str, str]:
        return {k: v for k, v in self.children(node).items() if k.startswith("children.")}

    def quorum_add_child(self, node: str, child: str) -> None:
        """Add node ``child`` to quorum ``node`` (no-op if it is a child already)."""
        node = validate_node_name(node)
        child = validate_node_name(child, "child")
        with self._lock:
            if child in self._quorum_children(node).values():
                return
            self.qmp.call("x-blockdev-change", {"parent": node, "node": child})
            LOG.info("qemu-storage-daemon %s: quorum %s gained %s", self.name, node, child)

    def quorum_remove_child(self, node: str, child: int | str) -> None:
        """Detach a child from quorum ``node``: by index N (edge ``children.N``), by edge
        name ``children.N`` or by the child's node name. "Already gone" is success. The
        child node itself stays; ``delete_node`` it afterwards if it is no longer wanted.

        Caution (E(4)): with a request stuck on a dead iSCSI child this hangs (the drain
        waits), so switch paths before I/O lands on a dead iSCSI path.
        """
        node = validate_node_name(node)
        if isinstance(child, int) and not isinstance(child, bool):
            edge = f"children.{_validate_int(child, 'child', 0, 1 << 30)}"
        elif isinstance(child, str) and re.fullmatch(r"children\.[0-9]+", child):
            edge = child
        else:
            edge = ""
            child = validate_node_name(child, "child")
        with self._lock:
            kids = self._quorum_children(node)
            if not edge:
                edge = next((k for k, v in kids.items() if v == child), "")
            if edge not in kids:
                return
            self.qmp.call("x-blockdev-change", {"parent": node, "child": edge})
            LOG.info(
                "qemu-storage-daemon %s: quorum %s lost %s (%s)", self.name, node, kids[edge], edge
            )

    def add_qcow2_cache(
        self,
        node: str,
        file_path: str | os.PathLike[str],
        backing_node: str,
        size: int | None = None,
    ) -> None:
        """A qcow2 cache over ``backing_node``, kept in ``file_path``.

        The file is created (``qemu-img create -f qcow2``, no backing recorded in it) with
        ``size`` bytes (default: the backing node's size) if it does not exist; an existing
        qcow2 of the same virtual size is reused, which is how a warm cache survives a
        restart. Another size or format raises ``Conflict`` (the file is left alone).
        """
        node = validate_node_name(node)
        path = validate_abs_path(file_path, "file_path")
        backing_node = validate_node_name(backing_node, "backing_node")
        if size is not None:
            size = _validate_int(size, "size", 512, 1 << 60)
            if size % 512:
                raise InvalidArgument("size", size, "must be a multiple of 512")
        with self._lock:
            named = self._named_nodes()
            have = named.get(node)
            if have is not None:
                # its "file" field is a json:{...} filename: compare the protocol child's
                kids = self.children(node)
                protocol = named.get(kids.get("file", ""), {})
                same = have["drv"] == "qcow2" and protocol.get("file") == path
                same = same and kids.get("backing") == backing_node
                self._add_node(node, "qcow2", same, {})
                return
            backing = named.get(backing_node)
            if backing is None:
                raise NotFound("block node", backing_node)
            if size is None:
                size = int(backing["image"]["virtual-size"])
            self._ensure_qcow2_file(path, size)
            options = {"file": {"driver": "file", "filename": path}, "backing": backing_node}
            self._add_node(node, "qcow2", None, options)

    @staticmethod
    def _ensure_qcow2_file(path: str, size: int) -> None:
        if os.path.exists(path):
            info = json.loads(
                execute(["qemu-img", "info", "-U", "--output=json", path], timeout_s=60).stdout
            )
            if info.get("format") != "qcow2" or int(info.get("virtual-size", -1)) != size:
                raise Conflict(
                    "cache file",
                    path,
                    f"is {info.get('format')} of {info.get('virtual-size')} bytes, not qcow2 "
                    f"of {size}",
                )
            LOG.info("reusing cache file %s (%s bytes allocated)", path, info.get("actual-size"))
            return
        execute(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], timeout_s=60)

    def add_copy_on_read(self, node: str, file_node: str) -> None:
        """A ``copy-on-read`` filter over ``file_node``: every read fills the cache below."""
        node = validate_node_name(node)
        file_node = validate_node_name(file_node, "file_node")
        with self._lock:
            have = self.node_info(node)
            same = None
            if have is not None:
                same = (
                    have["drv"] == "copy-on-read" and self.children(node).get("file") == file_node
                )
            self._add_node(node, "copy-on-read", same, {"file": file_node})

    def delete_node(self, node: str) -> None:
        """``blockdev-del`` (and the CHAP secret of an iSCSI node); no-op if absent."""
        node = validate_node_name(node)
        with self._lock:
            if self.node_info(node) is None:
                return
            self.qmp.call("blockdev-del", {"node-name": node})
            secret = f"{node}-secret"
            if secret in self._objects():
                self.qmp.call("object-del", {"id": secret})
            LOG.info("qemu-storage-daemon %s: deleted node %s", self.name, node)
