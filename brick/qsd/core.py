"""The process and QMP link of one qemu-storage-daemon, its state file, and its queries.

``DaemonCore`` is the base of ``brick.qsd.daemon.StorageDaemon``: it starts, adopts and
stops the daemon and reads its block nodes, exports and objects; ``brick.qsd.graph`` and
``brick.qsd.exports`` build on it. The process itself (pidfile, is-it-ours by command line
and start time, network namespace, SIGTERM then SIGKILL) is left to the one supervisor,
``brick.daemon.Supervisor``; the daemon forks itself (``--daemonize``) and writes its own
pidfile (``<pid>``), so ``Supervisor.daemonize`` starts it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brick import proc
from brick.daemon import Supervisor
from brick.exception import BrickError, Conflict, InvalidArgument, NotFound
from brick.executor import execute
from brick.fileio import atomic_write
from brick.qsd.mounts import mounted_paths, remove_empty_file
from brick.qsd.qmp import QMPClient, QMPDisconnected, QMPError
from brick.qsd.validate import (
    MAX_MMAP_THRESHOLD_KIB,
    _validate_int,
    validate_abs_path,
    validate_daemon_name,
    validate_netns,
    validate_node_name,
)
from brick.wait import wait_until

LOG = logging.getLogger("brick.qsd.daemon")

BINARY = "qemu-storage-daemon"
NETNS_DIR = Path("/var/run/netns")
QMP_CHARDEV = "qmp0"
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the NUL
_STOP_KILL_TIMEOUT_S = 5.0


# -- what the daemon reports -----------------------------------------------------------------
@dataclass(frozen=True)
class Export:
    """A block export as ``query-block-exports`` reports it."""

    id: str
    type: str
    node: str
    shutting_down: bool = False


class DaemonCore:
    """The process, QMP link, state file and queries of one ``qemu-storage-daemon``; the
    class to use, and the contract of its helpers, is ``brick.qsd.daemon.StorageDaemon``."""

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
        # the process: pidfile, is-it-ours (argv, start time), netns, SIGTERM -> SIGKILL
        self._supervisor = Supervisor(
            f"{BINARY} {self.name}", self.pidfile, self._matches, netns=self.netns
        )
        self._qmp: QMPClient | None = None
        self._lock = threading.RLock()  # check-then-act sequences of this object

    def __repr__(self) -> str:
        netns = f", netns={self.netns!r}" if self.netns else ""
        pid = self._supervisor.pid
        return f"StorageDaemon({self.name!r}, {str(self.run_dir)!r}{netns}, pid={pid})"

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
    def _matches(self, argv: Sequence[str]) -> bool:
        """Whether a command line is a qemu-storage-daemon with our QMP socket."""
        return os.path.basename(argv[0]) == BINARY and self._chardev_arg() in argv

    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live qemu-storage-daemon with our QMP socket (not a reused
        PID: the start time is checked too once we started or adopted it)."""
        return self._supervisor.is_ours(pid)

    def _known_pid(self) -> int | None:
        return self._supervisor.find()

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
            known = self._supervisor.pid
            if known is not None and self._is_ours(known):
                pid: int | None = known
            else:
                pid = self._supervisor.adopt()  # from the pidfile; Conflict: in another netns
            if pid is None:
                if self.pidfile.exists() or self.qmp_path.exists() or self.statefile.exists():
                    LOG.info("qemu-storage-daemon %s is not running: cleaning up", self.name)
                    self._clean_leftovers()
                return False
            if not self._supervisor.in_netns(pid):
                if proc.ended(pid, self._is_ours):
                    return False
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
                self._supervisor.pid = self._supervisor.started = None
                LOG.info("qemu-storage-daemon %s died as we adopted it: cleaning up", self.name)
                self._clean_leftovers()
                return False
            LOG.info("adopted qemu-storage-daemon %s pid %d", self.name, pid)
            return True

    def start(self, *, timeout_s: float = 30.0) -> None:
        """Start the daemon and connect QMP; idempotent (adopts our daemon if it runs).

        Raises ``NotFound`` if the network namespace does not exist, ``CommandFailed`` if the
        daemon does not start, ``Timeout`` if QMP does not answer in ``timeout_s``.
        """
        with self._lock:
            self._supervisor.check_netns()  # NotFound
            if self._qmp is not None and self._qmp.connected and self.running():
                return
            if self.adopt(timeout_s=timeout_s):
                return
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # --daemonize: the parent exits once the daemon is ready (socket bound, pidfile
            # written) and the daemon points its stdio at /dev/null, so the command returns;
            # NotFound if the pidfile it wrote names no daemon of ours
            pid = self._supervisor.daemonize(
                self.argv(), env=self.environment(), timeout_s=timeout_s
            )
            try:
                self._connect(timeout_s)
            except BaseException:
                self._kill()
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
            pid = self._kill(timeout_s=timeout_s)
            self._clean_leftovers()
            if pid is not None:
                LOG.info("stopped qemu-storage-daemon %s pid %d", self.name, pid)

    def _kill(self, *, timeout_s: float = 10.0) -> int | None:
        """SIGTERM our daemon, SIGKILL after ``timeout_s``; the PID that ended (or None)."""
        return self._supervisor.stop(timeout_s=timeout_s, kill_timeout_s=_STOP_KILL_TIMEOUT_S)

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
                remove_empty_file(mountpoint)
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
