"""One qemu-storage-daemon per compute node, driven at run time over QMP.

``StorageDaemon(name, run_dir)`` owns three files in ``run_dir``: ``<name>.qmp`` (the QMP
socket), ``<name>.pid`` (written by the daemon) and ``<name>.state.json`` (what QMP cannot
tell: the FUSE mountpoints and the NBD server address, so that ``stop`` after a restart still
unmounts exactly our mountpoints). Block nodes and exports are always read from the daemon.

Facts of QEMU 7.2 (qemu-storage-daemon 7.2.22) that shape this module:

- A node name is at most 31 characters (``Node name too long`` otherwise); export and
  object ids follow the same rule here.
- A daemon must never ``blockdev-add`` an NBD client of its own NBD server: the connect runs
  in the main loop that would serve it, so the daemon hangs (and then ignores SIGTERM).
- ``x-blockdev-change`` names quorum children ``children.N`` with N never reused: removing
  ``children.0`` of two and adding one gives ``children.1`` and ``children.2``. The names are
  read from ``x-debug-query-block-graph``. A quorum refuses to drop its last child
  (``The number of children cannot be lower than the vote threshold 1``).
- ``block-export-add type=fuse`` needs an existing regular file as mountpoint
  (``Failed to stat ...``). The file is mounted ``allow_other`` with mode 0400 owned by the
  daemon's user; ``chmod``/``chown`` on the mounted file work and last until unmount.
- ``nbd-server-start`` twice gives ``NBD server already running``; QMP cannot tell the
  address of a running server, hence the state file.
- An NBD server started with ``tls-creds`` of a ``tls-creds-psk`` object refuses every
  option before TLS (``nbdinfo --list`` without TLS gets an error, a wrong key fails the
  handshake); the server reads its ``keys.psk`` at each handshake, a client when its object
  is made. ``object-del`` of credentials still in use is not refused: delete them last.
- ``qom-list /objects`` fails with ``DeviceNotFound: Device '/objects' not found`` until the
  first ``object-add``. A ``secret`` passed by ``object-add`` keeps CHAP passwords off every
  command line.
- A FUSE export's mount gets the kernel's default readahead window, 128 KiB (the
  ``read_ahead_kb`` of its backing device, /sys/class/bdi/<major>:<minor>, whose numbers
  /proc/self/mountinfo gives); writing ``read_ahead_kb`` after the mount widens it (until
  unmount), so that a sequential reader has the next part of the file requested while it
  works on the last (the daemon still serves one FUSE request at a time).
- glibc's malloc raises its mmap threshold dynamically; until it has, every request buffer
  of 128 KiB or more is an mmap + munmap (and page faults). ``MALLOC_MMAP_THRESHOLD_`` in the
  daemon's environment fixes the threshold (and turns the dynamic adjustment off).
- SIGTERM ends the daemon and unmounts its FUSE exports, unless a request is stuck (a dead
  iSCSI path, see shared/reference/env-userspace-stack.md E(4)): then only SIGKILL helps and
  the FUSE mount stays behind (``Transport endpoint is not connected``) until unmounted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import brick.privileged.sysfs
from brick import proc, values
from brick.daemon import Pidfile, netns_identity, terminate
from brick.exception import BrickError, Conflict, InvalidArgument, NotFound
from brick.executor import execute
from brick.fileio import atomic_write
from brick.qsd.qmp import QMPClient, QMPDisconnected, QMPError
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

BINARY = "qemu-storage-daemon"
NETNS_DIR = Path("/var/run/netns")
QMP_CHARDEV = "qmp0"

_NODE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")  # QEMU: letter first, < 32 characters
_DAEMON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_CHAP_USER = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
_EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the NUL
_STOP_KILL_TIMEOUT_S = 5.0
_BDI_DIR = Path("/sys/class/bdi")
MAX_READAHEAD_KIB = 1 << 20
MAX_MMAP_THRESHOLD_KIB = 1 << 22


# -- validation (pure) -----------------------------------------------------------------------
def validate_node_name(value: object, field: str = "node") -> str:
    """A QEMU node name as used here: ``[A-Za-z][A-Za-z0-9_-]{0,30}`` (QEMU allows 31 chars)."""
    if not isinstance(value, str) or not _NODE.fullmatch(value):
        raise InvalidArgument(field, value, "must match [A-Za-z][A-Za-z0-9_-]{0,30}")
    return value


def validate_daemon_name(value: object) -> str:
    if not isinstance(value, str) or not _DAEMON_NAME.fullmatch(value):
        raise InvalidArgument("name", value, "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    return value


validate_netns = values.netns


def validate_abs_path(value: object, field: str) -> str:
    """An absolute path without control characters or commas (QEMU option syntax)."""
    if not isinstance(value, str | os.PathLike):
        raise InvalidArgument(field, value, "must be a path")
    text = os.fspath(value)
    if not isinstance(text, str) or not os.path.isabs(text):
        raise InvalidArgument(field, value, "must be an absolute path")
    if any(ord(c) < 32 or c == "\x7f" for c in text) or "," in text:
        raise InvalidArgument(field, value, "must not contain control characters or commas")
    return os.path.normpath(text)


def validate_host(value: object, field: str = "host") -> str:
    """An IP address literal or a DNS name; an IPv6 literal without brackets."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOSTNAME.fullmatch(value):
                return value
    raise InvalidArgument(field, value, "must be an IP address or a host name")


def validate_port(value: object, field: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidArgument(field, value, "must be an integer 1-65535")
    return value


def validate_portal(value: object, field: str = "portal") -> str:
    """``host:port`` or ``[ipv6]:port``; returned canonical."""
    if not isinstance(value, str) or ":" not in value:
        raise InvalidArgument(field, value, "must be host:port or [ipv6]:port")
    head, _, port_text = value.rpartition(":")
    if not port_text.isdigit():
        raise InvalidArgument(field, value, "must be host:port with a numeric port")
    port = validate_port(int(port_text), field)
    if head.startswith("[") and head.endswith("]"):
        try:
            return values.join_host_port(str(ipaddress.IPv6Address(head[1:-1])), port)
        except ValueError:
            raise InvalidArgument(field, value, "bad IPv6 address in brackets") from None
    if ":" in head:
        raise InvalidArgument(field, value, "an IPv6 address needs brackets: [ipv6]:port")
    return f"{validate_host(head, field)}:{port}"


def validate_iqn(value: object, field: str = "iqn") -> str:
    if not values.IQN.is_valid(value, forms=values.IQN.FORMS):
        raise InvalidArgument(field, value, "must be iqn.YYYY-MM.domain[:suffix], eui. or naa.")
    return str(value)


def _validate_int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(field, value, f"must be an integer {low}-{high}")
    return value


# -- /proc helpers ---------------------------------------------------------------------------
def _unescape_mount_field(text: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_device(path: str) -> str | None:
    """``major:minor`` of the file system mounted at ``path`` (from /proc/self/mountinfo;
    the last mount there wins), or None if nothing is mounted there."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and _unescape_mount_field(fields[4]) == path:
            found = fields[2]
    return found


def mounted_paths() -> set[str]:
    """Every mount point listed in /proc/mounts (of this mount namespace)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return set()
    return {_unescape_mount_field(line.split()[1]) for line in lines if len(line.split()) > 1}


# -- what the daemon reports -----------------------------------------------------------------
@dataclass(frozen=True)
class Export:
    """A block export as ``query-block-exports`` reports it."""

    id: str
    type: str
    node: str
    shutting_down: bool = False


class StorageDaemon:
    """One ``qemu-storage-daemon`` with a QMP monitor on ``run_dir/<name>.qmp``.

    With ``netns``, the daemon is started through ``nsenter --net=/var/run/netns/<netns>``: it
    joins only that network namespace and keeps the root mount namespace, so its FUSE exports
    are visible to tgtd and libvirt (``ip netns exec`` would hide them in a private one).

    Every helper validates its arguments before anything runs (``InvalidArgument``), is
    idempotent where that makes sense (the same request again is a no-op; an object with our
    name but other parameters raises ``Conflict``), and raises ``QMPError`` when QEMU refuses.
    """

    def __init__(
        self,
        name: str,
        run_dir: Path | str,
        *,
        netns: str | None = None,
        qmp_timeout_s: float = 30.0,
        malloc_mmap_threshold_kib: int | None = None,
    ) -> None:
        self.name = validate_daemon_name(name)
        self.malloc_mmap_threshold_kib = (
            None
            if malloc_mmap_threshold_kib is None
            else _validate_int(
                malloc_mmap_threshold_kib,
                "malloc_mmap_threshold_kib",
                1,
                MAX_MMAP_THRESHOLD_KIB,
            )
        )
        self.run_dir = Path(validate_abs_path(run_dir, "run_dir"))
        self.netns = None if netns is None else validate_netns(netns)
        self.qmp_timeout_s = qmp_timeout_s
        if len(os.fsencode(str(self.qmp_path))) > _MAX_SOCKET_PATH:
            raise InvalidArgument(
                "run_dir", str(run_dir), f"the QMP socket path exceeds {_MAX_SOCKET_PATH} bytes"
            )
        self._pid: int | None = None
        self._qmp: QMPClient | None = None
        self._lock = threading.RLock()  # check-then-act sequences of this object

    def __repr__(self) -> str:
        netns = f", netns={self.netns!r}" if self.netns else ""
        return f"StorageDaemon({self.name!r}, {str(self.run_dir)!r}{netns}, pid={self._pid})"

    # -- files ---------------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        return self.run_dir / f"{self.name}.qmp"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def statefile(self) -> Path:
        return self.run_dir / f"{self.name}.state.json"

    def _chardev_arg(self) -> str:
        return f"socket,id={QMP_CHARDEV},path={self.qmp_path},server=on,wait=off"

    def argv(self) -> list[str]:
        """The command line ``start`` runs."""
        base = [
            BINARY,
            "--chardev", self._chardev_arg(),
            "--monitor", f"chardev={QMP_CHARDEV}",
            "--pidfile", str(self.pidfile),
            "--daemonize",
        ]  # fmt: skip
        if self.netns is None:
            return base
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", *base]

    def environment(self) -> dict[str, str] | None:
        """The environment ``start`` runs the daemon with (None: ours, unchanged)."""
        if self.malloc_mmap_threshold_kib is None:
            return None
        env = dict(os.environ)
        env["MALLOC_MMAP_THRESHOLD_"] = str(self.malloc_mmap_threshold_kib * 1024)
        return env

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.statefile.read_text())
        except FileNotFoundError:
            state = {}
        except ValueError:
            LOG.warning("ignoring unreadable state file %s", self.statefile)
            state = {}
        state.setdefault("exports", {})
        state.setdefault("nbd_server", None)
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.statefile, json.dumps(state, indent=1, sort_keys=True))

    # -- which process is ours -----------------------------------------------------------
    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live qemu-storage-daemon with our QMP socket (not a reused
        PID)."""
        if proc.is_gone(pid):
            return False
        argv = proc.cmdline(pid)
        return bool(argv) and os.path.basename(argv[0]) == BINARY and self._chardev_arg() in argv

    def _pid_from_file(self) -> int | None:
        found = Pidfile(self.pidfile).read()
        return None if found is None else found[0]

    def _known_pid(self) -> int | None:
        for pid in (self._pid, self._pid_from_file()):
            if pid is not None and self._is_ours(pid):
                return pid
        return None

    def _netns_inode(self) -> tuple[int, int]:
        return netns_identity(self.netns)

    @property
    def pid(self) -> int | None:
        """The daemon's PID while it runs (None otherwise)."""
        return self._known_pid()

    def running(self) -> bool:
        """Whether our daemon process is alive (its QMP link may still be down)."""
        return self._known_pid() is not None

    @property
    def qmp(self) -> QMPClient:
        """The QMP client; ``NotFound`` if the daemon was not started or adopted. (Once the
        daemon has died, its calls raise ``QMPDisconnected`` with the reason.)"""
        if self._qmp is None:
            raise NotFound("qemu-storage-daemon QMP connection", str(self.qmp_path))
        return self._qmp

    def _connect(self, timeout_s: float) -> None:
        if self._qmp is not None:
            self._qmp.close()
        self._qmp = QMPClient(self.qmp_path, timeout_s=self.qmp_timeout_s)
        self._qmp.connect(timeout_s=timeout_s)

    # -- lifecycle -----------------------------------------------------------------------
    def adopt(self, *, timeout_s: float = 10.0) -> bool:
        """Reconnect to our daemon left running (by an earlier process) from its pidfile.

        Returns False if there is none; its leftovers (stale pidfile, socket, FUSE mounts of
        a killed daemon) are cleaned up then. Raises ``Conflict`` if it runs in another
        network namespace than asked for. The earlier owner must have disconnected: QMP
        serves one client at a time (``Timeout`` otherwise).
        """
        with self._lock:
            pid = self._known_pid()
            if pid is None:
                if self.pidfile.exists() or self.qmp_path.exists() or self.statefile.exists():
                    LOG.info("qemu-storage-daemon %s is not running: cleaning up", self.name)
                    self._clean_leftovers()
                return False
            try:
                theirs = os.stat(f"/proc/{pid}/ns/net")
            except FileNotFoundError:
                return False
            if (theirs.st_dev, theirs.st_ino) != self._netns_inode():
                raise Conflict(
                    "qemu-storage-daemon", self.name, f"pid {pid} is not in netns {self.netns}"
                )
            try:
                self._connect(timeout_s)
            except QMPDisconnected:
                # a daemon that was just killed can still be exiting: its socket resets
                wait_until(
                    lambda: proc.ended(pid, self._is_ours),
                    timeout_s=_STOP_KILL_TIMEOUT_S,
                    what=f"qemu-storage-daemon pid {pid}, whose QMP socket resets, to exit",
                )
                self.detach()
                LOG.info("qemu-storage-daemon %s died as we adopted it: cleaning up", self.name)
                self._clean_leftovers()
                return False
            self._pid = pid
            LOG.info("adopted qemu-storage-daemon %s pid %d", self.name, pid)
            return True

    def start(self, *, timeout_s: float = 30.0) -> None:
        """Start the daemon and connect QMP; idempotent (adopts our daemon if it runs).

        Raises ``NotFound`` if the network namespace does not exist, ``CommandFailed`` if the
        daemon does not start, ``Timeout`` if QMP does not answer in ``timeout_s``.
        """
        with self._lock:
            if self.netns is not None and not (NETNS_DIR / self.netns).exists():
                raise NotFound("network namespace", self.netns)
            if self._qmp is not None and self._qmp.connected and self.running():
                return
            if self.adopt(timeout_s=timeout_s):
                return
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # --daemonize: the parent exits once the daemon is ready (socket bound, pidfile
            # written) and the daemon points its stdio at /dev/null, so execute() returns.
            execute(self.argv(), timeout_s=timeout_s, env=self.environment())
            pid = self._pid_from_file()
            if pid is None or not self._is_ours(pid):
                raise NotFound("qemu-storage-daemon process", f"{self.name} (pidfile {pid})")
            self._pid = pid
            try:
                self._connect(timeout_s)
            except BaseException:
                self._kill(pid)
                self._clean_leftovers()
                raise
            LOG.info(
                "started qemu-storage-daemon %s pid %d%s",
                self.name,
                pid,
                f" in netns {self.netns}" if self.netns else "",
            )

    def detach(self) -> None:
        """Close the QMP link and leave the daemon running (another owner may adopt it)."""
        with self._lock:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM by PID, SIGKILL after ``timeout_s``; then unmount our FUSE mountpoints
        that are still mounted (``fusermount3 -u -z``) and remove the socket, pidfile and
        state file. Idempotent; ``Timeout`` only if the process outlives SIGKILL."""
        with self._lock:
            self.detach()
            pid = self._known_pid()
            if pid is not None:
                self._kill(pid, timeout_s=timeout_s)
            self._clean_leftovers()
            self._pid = None
            if pid is not None:
                LOG.info("stopped qemu-storage-daemon %s pid %d", self.name, pid)

    def _kill(self, pid: int, *, timeout_s: float = 10.0) -> None:
        terminate(
            pid,
            self._is_ours,
            what="qemu-storage-daemon",
            timeout_s=timeout_s,
            kill_timeout_s=_STOP_KILL_TIMEOUT_S,
        )

    def _clean_leftovers(self) -> None:
        """With the daemon gone: unmount our FUSE exports, drop the files we made."""
        state = self._load_state()
        mounted = mounted_paths()
        errors: list[BrickError] = []
        for export_id, info in state["exports"].items():
            if info.get("type") != "fuse":
                continue
            mountpoint = info["mountpoint"]
            if mountpoint in mounted:
                LOG.warning("unmounting %s left by FUSE export %s", mountpoint, export_id)
                try:
                    execute(["fusermount3", "-u", "-z", mountpoint], timeout_s=30)
                except BrickError as exc:
                    errors.append(exc)
                    continue
            if info.get("created"):
                _remove_empty_file(mountpoint)
        # the state file stays while a mount could not be undone, so that a retry finds it
        for path in (self.qmp_path, self.pidfile, *(() if errors else (self.statefile,))):
            path.unlink(missing_ok=True)
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"also: {other}")
            raise errors[0]

    # -- queries -------------------------------------------------------------------------
    def _named_nodes(self) -> dict[str, dict[str, Any]]:
        nodes = self.qmp.call("query-named-block-nodes", {"flat": True})
        return {n["node-name"]: n for n in nodes}

    def nodes(self) -> list[str]:
        """The names of the block nodes named by us (QEMU's own ``#blockN`` left out)."""
        return sorted(n for n in self._named_nodes() if not n.startswith("#"))

    def node_info(self, node: str) -> dict[str, Any] | None:
        """``query-named-block-nodes``' entry for ``node``, or None."""
        node = validate_node_name(node)
        return self._named_nodes().get(node)

    def node_size(self, node: str) -> int:
        """The virtual size of ``node`` in bytes; ``NotFound`` if there is no such node."""
        info = self.node_info(node)
        if info is None:
            raise NotFound("block node", node)
        return int(info["image"]["virtual-size"])

    def children(self, node: str) -> dict[str, str]:
        """``{edge name: child node name}`` of ``node`` (``file``, ``backing``,
        ``children.N``), read from ``x-debug-query-block-graph``."""
        node = validate_node_name(node)
        graph = self.qmp.call("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        ids = [n["id"] for n in graph["nodes"] if n["name"] == node and n["type"] == "block-driver"]
        if not ids:
            raise NotFound("block node", node)
        return {e["name"]: names[e["child"]] for e in graph["edges"] if e["parent"] == ids[0]}

    def exports(self) -> list[Export]:
        return [
            Export(e["id"], e["type"], e["node-name"], bool(e.get("shutting-down")))
            for e in self.qmp.call("query-block-exports")
        ]

    def _export(self, export_id: str) -> Export | None:
        return next((e for e in self.exports() if e.id == export_id), None)

    def _objects(self) -> set[str]:
        """The ids of the QOM objects (secrets) of the daemon."""
        try:
            found = self.qmp.call("qom-list", {"path": "/objects"})
        except QMPError as exc:
            if exc.error_class == "DeviceNotFound":  # made on the first object-add
                return set()
            raise
        return {o["name"] for o in found if o["type"].startswith("child<")}

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
        address = f"{host}:{port}"
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
                    _remove_empty_file(path)
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
                    _remove_empty_file(info["mountpoint"])
                self._save_state(state)


def _remove_empty_file(path: str) -> None:
    """Remove ``path`` if it is an empty regular file (a FUSE mountpoint we made)."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if info.st_size == 0 and (info.st_mode & 0o170000) == 0o100000:
            os.unlink(path)


__all__ = [
    "Export",
    "QMPDisconnected",
    "StorageDaemon",
    "mount_device",
    "mounted_paths",
    "validate_abs_path",
    "validate_host",
    "validate_iqn",
    "validate_node_name",
    "validate_portal",
]
