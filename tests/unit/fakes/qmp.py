"""A QMP server on a unix socket, in this process, that keeps a small model of
qemu-storage-daemon's state (block nodes and their edges, exports, QOM objects, the NBD
server) and records every command it is sent.

``FakeQMP(path)`` listens at ``path`` and serves one client at a time (as QEMU's chardev
does): the greeting, then ``qmp_capabilities``, then the commands below. ``fail(command)``
makes the next such command (matching ``when``, if given) answer with a QMP error; the
model is left unchanged by a failed command, as QEMU leaves it.

``stand_in(bin_dir, socket)``: a ``qemu-storage-daemon`` script for PATH. Started by
``brick.qsd`` with ``--daemonize``, it links the ``--chardev`` socket path to this server's
socket (given one) and leaves behind a sleeping process named ``qemu-storage-daemon`` with
that command line whose PID it writes to ``--pidfile``, so that ``StorageDaemon.start`` (and
``stop``, which ends the process by its PID) run as with the real daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brick import values

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}
DEFAULT_SIZE = 1 << 30  # what a network node (nbd, iscsi) reports as its size


class Refused(Exception):
    """A QMP error reply: ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.error_class = desc, error_class


@dataclass
class Node:
    name: str
    drv: str
    file: str
    size: int
    read_only: bool = True
    children: dict[str, str] = field(default_factory=dict)  # edge -> node name


@dataclass
class Failure:
    command: str
    when: Callable[[Mapping[str, Any]], bool] | None
    desc: str
    error_class: str


class FakeQMP:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.nodes: dict[str, Node] = {}
        self.exports: dict[str, dict[str, Any]] = {}
        self.objects: dict[str, dict[str, Any]] = {}
        self.nbd_server: dict[str, Any] | None = None
        self.sent: list[tuple[str, dict[str, Any]]] = []  # every command, in order
        self.failures: list[Failure] = []
        self._implicit = 0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._thread = threading.Thread(target=self._serve, name="fake-qmp", daemon=True)
        self._thread.start()

    # -- what the test sees and steers ---------------------------------------------------
    def fail(
        self,
        command: str,
        when: Callable[[Mapping[str, Any]], bool] | None = None,
        desc: str = "refused by the test",
        error_class: str = "GenericError",
    ) -> None:
        """The next ``command`` (whose arguments satisfy ``when``) answers with an error."""
        self.failures.append(Failure(command, when, desc, error_class))

    def commands(self, *, queries: bool = False) -> list[str]:
        """The names of the commands sent so far (without queries, unless asked)."""
        return [c for c, _ in self.sent if queries or not _is_query(c)]

    def changes(self) -> list[tuple[str, str]]:
        """``(command, what it names)`` of every command that changes state, in order."""
        return [(c, _subject(c, a)) for c, a in self.sent if not _is_query(c)]

    def clear(self) -> None:
        self.sent.clear()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self._thread.join(timeout=5)

    # -- the server ----------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._send(conn, GREETING)
            buf = b""
            while chunk := conn.recv(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        for message in self._handle(json.loads(line)):
                            self._send(conn, message)

    @staticmethod
    def _send(conn: socket.socket, message: Mapping[str, Any]) -> None:
        conn.sendall(json.dumps(message).encode() + b"\n")

    def _handle(self, request: Mapping[str, Any]) -> list[dict[str, Any]]:
        command = request["execute"]
        arguments = dict(request.get("arguments") or {})
        events: list[dict[str, Any]] = []
        with self._lock:
            self.sent.append((command, arguments))
            try:
                failure = next(
                    (
                        f
                        for f in self.failures
                        if f.command == command and (f.when is None or f.when(arguments))
                    ),
                    None,
                )
                if failure is not None:
                    self.failures.remove(failure)
                    raise Refused(failure.desc, failure.error_class)
                handler = getattr(self, "_do_" + command.replace("-", "_"), None)
                if handler is None:
                    raise Refused(f"The command {command} has not been found", "CommandNotFound")
                result = handler(arguments, events)
            except Refused as exc:
                reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
            else:
                reply = {"return": {} if result is None else result}
        reply["id"] = request.get("id")
        return [*events, reply]  # QEMU sends an export's DELETED event before the reply

    # -- commands ------------------------------------------------------------------------
    def _do_qmp_capabilities(self, args: dict[str, Any], events: list[Any]) -> None:
        return None

    def _do_query_named_block_nodes(self, args: dict[str, Any], events: list[Any]) -> Any:
        return [
            {
                "node-name": n.name,
                "drv": n.drv,
                "file": n.file,
                "ro": n.read_only,
                "image": {"virtual-size": n.size},
            }
            for n in self.nodes.values()
        ]

    def _do_x_debug_query_block_graph(self, args: dict[str, Any], events: list[Any]) -> Any:
        ids = {name: i for i, name in enumerate(self.nodes)}
        return {
            "nodes": [{"id": ids[n], "name": n, "type": "block-driver"} for n in self.nodes],
            "edges": [
                {"parent": ids[n.name], "child": ids[child], "name": edge}
                for n in self.nodes.values()
                for edge, child in n.children.items()
            ],
        }

    def _do_blockdev_add(self, args: dict[str, Any], events: list[Any]) -> None:
        name, drv = args["node-name"], args["driver"]
        if name in self.nodes:
            raise Refused(f"Duplicate nodes with node-name='{name}'")
        children: dict[str, str] = {}
        size = DEFAULT_SIZE
        file = drv
        if drv == "nbd":
            server = args["server"]
            file = f"nbd://{values.bracket(server['host'])}:{server['port']}/{args['export']}"
        elif drv == "iscsi":
            file = f"iscsi://{args['portal']}/{args['target']}/{args['lun']}"
        elif drv == "quorum":
            children = {f"children.{i}": c for i, c in enumerate(args["children"])}
        elif drv == "qcow2":
            self._implicit += 1
            protocol = f"#block{self._implicit}"
            children = {"file": protocol, "backing": args["backing"]}
            file = f"json:{json.dumps(args['file'])}"
            implicit = Node(protocol, "file", args["file"]["filename"], DEFAULT_SIZE, False)
        elif drv == "copy-on-read":
            children = {"file": args["file"]}
        elif drv == "file":
            file = args["filename"]
        for child in children.values():
            if child not in self.nodes and not child.startswith("#"):
                raise Refused(f"Cannot find node '{child}'")
        if children:
            first = next(iter(children.values()))
            size = self.nodes[children.get("backing", first)].size
        if drv == "qcow2":
            self.nodes[protocol] = implicit
        self.nodes[name] = Node(name, drv, file, size, bool(args.get("read-only", True)), children)

    def _parents(self, name: str) -> list[str]:
        return [n.name for n in self.nodes.values() if name in n.children.values()]

    def _do_blockdev_del(self, args: dict[str, Any], events: list[Any]) -> None:
        name = args["node-name"]
        if name not in self.nodes:
            raise Refused(f"Failed to find node with node-name='{name}'")
        users = self._parents(name) + [e["id"] for e in self.exports.values() if e["node"] == name]
        if users:
            raise Refused(f"Node '{name}' is busy: used by {', '.join(users)}")
        node = self.nodes.pop(name)
        for child in node.children.values():
            if child.startswith("#"):
                self.nodes.pop(child, None)

    def _do_x_blockdev_change(self, args: dict[str, Any], events: list[Any]) -> None:
        parent = self.nodes[args["parent"]]
        if "node" in args:
            used = {int(e.split(".")[1]) for e in parent.children}
            index = next(i for i in range(len(used) + 1) if i not in used)
            parent.children[f"children.{index}"] = args["node"]
        else:
            if args["child"] not in parent.children:
                raise Refused(f"Node '{parent.name}' does not have child '{args['child']}'")
            del parent.children[args["child"]]

    def _do_query_block_exports(self, args: dict[str, Any], events: list[Any]) -> Any:
        return [
            {"id": e["id"], "type": e["type"], "node-name": e["node"], "shutting-down": False}
            for e in self.exports.values()
        ]

    def _do_block_export_add(self, args: dict[str, Any], events: list[Any]) -> None:
        if args["id"] in self.exports:
            raise Refused(f"Block export id '{args['id']}' is already in use")
        if args["node-name"] not in self.nodes:
            raise Refused(f"Cannot find node '{args['node-name']}'")
        if args["type"] == "nbd" and self.nbd_server is None:
            raise Refused("NBD server not running")
        self.exports[args["id"]] = {
            "id": args["id"],
            "type": args["type"],
            "node": args["node-name"],
        }

    def _do_block_export_del(self, args: dict[str, Any], events: list[Any]) -> None:
        if self.exports.pop(args["id"], None) is None:
            raise Refused(f"Export '{args['id']}' is not found")
        events.append({"event": "BLOCK_EXPORT_DELETED", "data": {"id": args["id"]}})

    def _do_qom_list(self, args: dict[str, Any], events: list[Any]) -> Any:
        if not self.objects:
            raise Refused("Device '/objects' not found", "DeviceNotFound")
        return [{"name": k, "type": f"child<{v['qom-type']}>"} for k, v in self.objects.items()]

    def _do_qom_get(self, args: dict[str, Any], events: list[Any]) -> Any:
        obj = self.objects[args["path"].rpartition("/")[2]]
        return obj.get(args["property"], "")

    def _do_object_add(self, args: dict[str, Any], events: list[Any]) -> None:
        if args["id"] in self.objects:
            raise Refused(f"attempt to add duplicate property '{args['id']}'")
        self.objects[args["id"]] = args

    def _do_object_del(self, args: dict[str, Any], events: list[Any]) -> None:
        if self.objects.pop(args["id"], None) is None:
            raise Refused(f"object '{args['id']}' not found", "DeviceNotFound")

    def _do_nbd_server_start(self, args: dict[str, Any], events: list[Any]) -> None:
        if self.nbd_server is not None:
            raise Refused("NBD server already running")
        self.nbd_server = args

    def _do_nbd_server_stop(self, args: dict[str, Any], events: list[Any]) -> None:
        if self.nbd_server is None:
            raise Refused("NBD server not running")
        self.nbd_server = None
        self.exports = {k: v for k, v in self.exports.items() if v["type"] != "nbd"}


def _is_query(command: str) -> bool:
    return command.startswith(("query-", "qom-", "x-debug-")) or command == "qmp_capabilities"


def _subject(command: str, args: Mapping[str, Any]) -> str:
    for key in ("id", "node-name", "parent"):
        if key in args:
            return str(args[key])
    return ""


# -- a stand-in qemu-storage-daemon ------------------------------------------------------------
_STAND_IN = """#!/bin/bash
# a stand-in for qemu-storage-daemon --daemonize (tests/unit/fakes/qmp.py)
pidfile=; sock=; prev=
for a in "$@"; do
  [ "$prev" = --pidfile ] && pidfile=$a
  if [ "$prev" = --chardev ]; then sock=${a#*path=}; sock=${sock%%,*}; fi
  prev=$a
done
# the environment it was started with, for the test to read
echo "${MALLOC_MMAP_THRESHOLD_:-unset}" > "$(dirname "$pidfile")/env.txt"
[ -n "$FAKE_QMP_SOCKET" ] && ln -sf "$FAKE_QMP_SOCKET" "$sock"
export PIDFILE=$pidfile
(exec -a qemu-storage-daemon "$FAKE_QMP_PYTHON" -c "$FAKE_QMP_DAEMON" "$@" \\
  </dev/null >/dev/null 2>&1) &
# like --daemonize: return once the daemon has written its pidfile
for _ in $(seq 500); do [ -s "$pidfile" ] && exit 0; sleep 0.01; done
exit 1
"""
_DAEMON = """
import os, signal
tmp = os.environ["PIDFILE"] + ".tmp"
with open(tmp, "w") as f:
    f.write(f"{os.getpid()}\\n")
os.replace(tmp, os.environ["PIDFILE"])
signal.pause()
"""


def stand_in(bin_dir: Path, qmp_socket: Path | None) -> dict[str, str]:
    """Write the stand-in ``qemu-storage-daemon`` into ``bin_dir``; returns the environment
    it needs (``PATH`` with ``bin_dir`` first, and its own variables). Without
    ``qmp_socket`` it serves no QMP (a connect times out). It writes the
    ``MALLOC_MMAP_THRESHOLD_`` it was started with (or ``unset``) to ``env.txt`` beside
    its pidfile."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "qemu-storage-daemon"
    script.write_text(_STAND_IN)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_QMP_SOCKET": "" if qmp_socket is None else str(qmp_socket),
        "FAKE_QMP_PYTHON": sys.executable,
        "FAKE_QMP_DAEMON": _DAEMON,
    }
