"""Virtman's XML-RPC API: the original's six methods on ``/RPC2`` (port 7774).

The HTTP front end is ours (not ``SimpleXMLRPCServer``), so that nobody on the network can
hold the daemon's memory or threads:

* one I/O thread reads every connection (TLS handshake, headers, body) without blocking,
  each within ``request_timeout`` seconds of its accept; a stalled client costs a socket,
  not a thread, and is closed at its deadline;
* the credential, path, method and ``Content-Length`` are checked on the headers alone:
  a refused request is answered (401/404/405/411/413) before any body byte is read;
* only complete, authenticated requests reach the ``rpc_workers`` threads that run calls;
* at most ``max_connections`` connections are open, ``max_connections_per_peer`` of them
  from one address; one more is answered 503.

One request per connection (``Connection: close``), as ``xmlrpc.client`` expects.
"""

from __future__ import annotations

import builtins
import enum
import hmac
import http.client
import io
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
import xmlrpc.client
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from xmlrpc.server import SimpleXMLRPCDispatcher

from virtman.compute import Virtman
from virtman.errors import GuestNotFound, InvalidInput, VirtmanError
from virtman.imageservice import ImageService
from virtmanclient.exceptions import FAULT_GUEST_NOT_FOUND

LOG = logging.getLogger(__name__)

RPC_PATH = "/RPC2"
MAX_HEADER_BYTES = 16 * 1024  # request line and headers
DRAIN_S = 2.0  # a refused request's body is read and dropped this long, so the answer arrives
RECV_BYTES = 64 * 1024
REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Limits:
    """What one client may take from the server (see the options of the same names)."""

    token: str | None
    max_request_bytes: int = 1 << 20
    request_timeout: float = 5.0
    rpc_workers: int = 16
    max_connections: int = 512
    max_connections_per_peer: int = 64


class _State(enum.Enum):
    HANDSHAKE = "handshake"
    HEADERS = "headers"
    BODY = "body"
    DRAIN = "drain"


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    deadline: float
    state: _State
    buf: bytearray = field(default_factory=bytearray)
    body_bytes: int = 0


class Server:
    """The XML-RPC server of a node (``serve_forever``/``shutdown``/``server_close`` as the
    standard library's servers)."""

    def __init__(
        self,
        address: tuple[str, int],
        dispatcher: SimpleXMLRPCDispatcher,
        limits: Limits,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.limits = limits
        self.ssl_context = ssl_context
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.listener = socket.create_server(address, family=family, backlog=128)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()[:2]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.conns: dict[int, _Conn] = {}  # being read or drained (by the I/O thread)
        self.open_count = 0  # every open connection, in a worker's hands too
        self.open_by_peer: Counter[str] = Counter()  # the same, per client address
        self.count_lock = threading.Lock()
        self.jobs: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.workers = [
            threading.Thread(target=self._work, name=f"rpc-worker-{i}", daemon=True)
            for i in range(limits.rpc_workers)
        ]
        for worker in self.workers:
            worker.start()

    # -- life cycle --------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.stopped.clear()
        try:
            while not self.stopping.is_set():
                for key, _mask in self.selector.select(self._select_timeout(poll_interval)):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._wake_r.recv(64)
                    else:
                        self._on_ready(key.data)
                self._expire(time.monotonic())
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (from another thread) and wait for it to return."""
        self.stopping.set()
        self._wake_w.send(b"x")
        self.stopped.wait()

    def server_close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.selector.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()
        for _ in self.workers:
            self.jobs.put(None)
        deadline = time.monotonic() + 2.0  # idle workers end now; one in a long call is left
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _select_timeout(self, poll_interval: float) -> float:
        if not self.conns:
            return poll_interval
        earliest = min(c.deadline for c in self.conns.values())
        return max(0.0, min(poll_interval, earliest - time.monotonic()))

    # -- the I/O thread ------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: the backlog keeps the client waiting
                LOG.warning("XML-RPC: cannot accept a connection: %s", exc)
                return
            peer = str(address[0])
            sock.setblocking(False)
            with self.count_lock:
                if self.open_count >= self.limits.max_connections:
                    full = f"{self.open_count} connections open (max_connections)"
                elif self.open_by_peer[peer] >= self.limits.max_connections_per_peer:
                    full = f"{self.open_by_peer[peer]} from it open (max_connections_per_peer)"
                else:
                    full = ""
                    self.open_count += 1
                    self.open_by_peer[peer] += 1
            if full:
                LOG.warning("XML-RPC: refused a connection from %s: %s", peer, full)
                if self.ssl_context is None:  # a TLS client could not read a plain answer
                    _send_now(sock, _response(503, b"too many connections\n"))
                sock.close()
                continue
            state = _State.HEADERS
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
                state = _State.HANDSHAKE
            conn = _Conn(sock, peer, time.monotonic() + self.limits.request_timeout, state)
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _on_ready(self, conn: _Conn) -> None:
        if conn.state is _State.HANDSHAKE and not self._handshake(conn):
            return
        for _ in range(16):  # then let the other connections have their turn
            want = RECV_BYTES
            if conn.state is _State.BODY:
                want = min(want, conn.body_bytes - len(conn.buf))
            try:
                data = conn.sock.recv(want)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                LOG.debug("XML-RPC: connection from %s failed: %s", conn.peer, exc)
                self._close(conn)
                return
            if not data:
                if conn.state is not _State.DRAIN:
                    LOG.debug("XML-RPC: %s closed before a whole request", conn.peer)
                self._close(conn)
                return
            if conn.state is _State.DRAIN:
                continue
            conn.buf += data
            if conn.state is _State.HEADERS and not self._headers(conn):
                return
            if conn.state is _State.BODY and len(conn.buf) >= conn.body_bytes:
                self._dispatch(conn)
                return

    def _handshake(self, conn: _Conn) -> bool:
        """Advance a TLS handshake; True once it is done."""
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)  # only TLS connections have a handshake
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.selector.modify(sock, selectors.EVENT_READ, conn)
            return False
        except ssl.SSLWantWriteError:
            self.selector.modify(sock, selectors.EVENT_WRITE, conn)
            return False
        except (ssl.SSLError, OSError) as exc:
            LOG.warning("XML-RPC: refused a connection from %s: TLS handshake: %s", conn.peer, exc)
            self._close(conn)
            return False
        self.selector.modify(sock, selectors.EVENT_READ, conn)
        conn.state = _State.HEADERS
        return True

    def _headers(self, conn: _Conn) -> bool:
        """Check a request on its headers alone once they are in; True if its body is next."""
        end = conn.buf.find(b"\r\n\r\n")
        if end > MAX_HEADER_BYTES or (end < 0 and len(conn.buf) > MAX_HEADER_BYTES):
            self._refuse(conn, 431, f"headers larger than {MAX_HEADER_BYTES} bytes")
            return False
        if end < 0:
            return False
        head, rest = bytes(conn.buf[:end]), bytes(conn.buf[end + 4 :])
        request_line, _, header_block = head.partition(b"\r\n")
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._refuse(conn, 400, "not an HTTP/1.x request line")
            return False
        method, target = parts[0], parts[1]
        try:
            headers = http.client.parse_headers(io.BytesIO(header_block + b"\r\n\r\n"))
        except http.client.HTTPException:
            self._refuse(conn, 431, "too many headers")
            return False
        token = self.limits.token
        given = headers.get("X-Auth-Token", "")
        if token and not hmac.compare_digest(
            given.encode("utf-8", "replace"), token.encode("utf-8")
        ):
            reason = "wrong X-Auth-Token" if given else "no X-Auth-Token"
            self._refuse(conn, 401, f"{reason} ({method} {target[:80]!r})")
            return False
        if target != RPC_PATH:
            self._refuse(conn, 404, f"no such path {target[:80]!r} (only {RPC_PATH})")
            return False
        if method != "POST":
            self._refuse(conn, 405, f"method {method[:20]!r} (only POST)")
            return False
        lengths = headers.get_all("Content-Length") or []
        if headers.get("Transfer-Encoding") is not None or not lengths:
            self._refuse(conn, 411, "no Content-Length (chunked bodies are not accepted)")
            return False
        if len(set(lengths)) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
            self._refuse(conn, 400, f"bad Content-Length {lengths!r:.80}")
            return False
        size = int(lengths[0])
        if size > self.limits.max_request_bytes:
            self._refuse(
                conn,
                413,
                f"body of {size} bytes (max_request_bytes {self.limits.max_request_bytes})",
            )
            return False
        if headers.get("Expect", "").lower() == "100-continue":
            _send_now(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.state, conn.body_bytes = _State.BODY, size
        conn.buf = bytearray(rest[:size])
        return True

    def _refuse(self, conn: _Conn, status: int, why: str) -> None:
        """Answer ``status`` now, then drop what the client still sends for a moment (closing
        with unread bytes would reset the connection before the client reads the answer)."""
        LOG.warning("XML-RPC: refused a request from %s: %d %s", conn.peer, status, why)
        body = f"{status} {REASONS[status]}: {why}\n".encode("utf-8", "replace")
        extra = [("Allow", "POST")] if status == 405 else []
        _send_now(conn.sock, _response(status, body, extra))
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state, conn.buf = _State.DRAIN, bytearray()
        conn.deadline = min(conn.deadline, time.monotonic() + DRAIN_S)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            if conn.state is not _State.DRAIN:
                LOG.warning(
                    "XML-RPC: closed a connection from %s: no whole request within %g s "
                    "(request_timeout; %s, %d bytes read)",
                    conn.peer,
                    self.limits.request_timeout,
                    conn.state.value,
                    len(conn.buf),
                )
            self._close(conn)

    def _dispatch(self, conn: _Conn) -> None:
        """Hand a complete request to the workers (they close its connection)."""
        self.selector.unregister(conn.sock)
        del self.conns[conn.sock.fileno()]
        self.jobs.put(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self.conns.get(fd) is conn:
            del self.conns[fd]
            self.selector.unregister(conn.sock)
        conn.sock.close()
        self._closed(conn.peer)

    def _closed(self, peer: str) -> None:
        with self.count_lock:
            self.open_count -= 1
            self.open_by_peer[peer] -= 1
            if not self.open_by_peer[peer]:
                del self.open_by_peer[peer]

    # -- the workers -----------------------------------------------------------------------
    def _work(self) -> None:
        while (conn := self.jobs.get()) is not None:
            try:
                answer = self.dispatcher._marshaled_dispatch(bytes(conn.buf))
                # CPython returns the encoded answer (bytes); typeshed says str.
                body = answer.encode() if isinstance(answer, str) else answer
                conn.sock.settimeout(self.limits.request_timeout)  # to take the answer
                conn.sock.sendall(_response(200, body, content_type="text/xml"))
            except OSError as exc:
                LOG.warning("XML-RPC: could not answer %s: %s", conn.peer, exc)
            except Exception:  # a bug of ours: the worker must survive it
                LOG.exception("XML-RPC: a call from %s failed", conn.peer)
            finally:
                conn.sock.close()
                self._closed(conn.peer)


def _response(
    status: int,
    body: bytes,
    extra: list[tuple[str, str]] | None = None,
    content_type: str = "text/plain; charset=utf-8",
) -> bytes:
    reason = "OK" if status == 200 else REASONS[status]
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}"]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "Server: virtman"]
    lines += [f"{name}: {value}" for name, value in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _send_now(sock: socket.socket, data: bytes) -> None:
    """Send a short answer without blocking (it fits a fresh socket's buffer); a client that
    does not read loses it."""
    try:
        sock.send(data)
    except (OSError, ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
        LOG.debug("XML-RPC: could not send an answer: %s", exc)


class Methods:
    """The original's method names and results (nothing else here is callable remotely:
    names with a leading underscore are not dispatched)."""

    def __init__(self, virtman: Virtman, images: ImageService, guests: Any = None) -> None:
        self._virtman = virtman
        self._images = images
        self._guests = guests  # virtman.guest.manager.Guests (not imported: no libvirt here)
        if virtman is not None and virtman.image_service is None:
            virtman.image_service = images  # where this node's captures are exported

    def create(
        self, instance_name: str, image_name: str, image_connection: Any, snapshot_dev: Any = None
    ) -> str:
        return self._virtman.create(instance_name, image_name, image_connection, snapshot_dev)

    def destroy(self, instance_name: str) -> str:
        return self._virtman.destroy(instance_name)

    def list(self) -> list[str]:
        return self._virtman.list()

    def capture(self, instance_name: str, image_name: str) -> str:
        """A new image from an instance's disk (quiesced by the caller), exported here."""
        return self._virtman.capture(instance_name, image_name)

    def create_image_target(self, *args: Any) -> str:  # ImageService's own arguments
        return self._images.create_image_target(*args)

    def destroy_image_target(self, image_name: str) -> str:
        # This node's own stack of the image reads the target: an idle one is torn down
        # first (what the heartbeat does soon). Cut off mid-teardown, QEMU's iSCSI logout
        # waited forever and wedged qemu-storage-daemon (seen in CI).
        try:
            why = self._virtman.drop_idle_image(image_name)
        except InvalidInput:
            why = None  # the image service answers the bad name
        if why:
            LOG.info("destroy_image_target %s: this node's stack stays (%s)", image_name, why)
        return self._images.destroy_image_target(image_name)

    def list_image_target(self) -> dict[str, str]:
        return self._images.list_image_target()

    # -- the node's guests (virtman.guest.manager; errors come back as XML-RPC faults) ----------
    def _guest_manager(self) -> Any:
        if self._guests is None:
            raise VirtmanError("this node serves no guests")
        return self._guests

    def guest_list(self) -> builtins.list[str]:
        return list(self._guest_manager().list())

    def guest_create(self, userid: str, vcpus: int, memory_mb: int, disk_gb: int = 0) -> bool:
        self._guest_manager().create(userid, vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb)
        return True

    def guest_deploy(self, userid: str, image: str) -> bool:
        self._guest_manager().deploy(userid, image)
        return True

    def guest_create_once(self, userid: str, vcpus: int, memory_mb: int, disk_gb: int = 0) -> bool:
        """``guest_create``, idempotent by userid (``GuestRecords.create_once``): True if
        created now."""
        return bool(self._guest_manager().create_once(userid, vcpus, memory_mb, disk_gb))

    def guest_deploy_once(self, userid: str, image: str) -> bool:
        """``guest_deploy``, idempotent by userid: True if deployed now."""
        return bool(self._guest_manager().deploy_once(userid, image))

    def guest_action(self, userid: str, action: str, options: Any = None) -> bool:
        """``action``: start, stop, softstop (``options``: timeout_s, poll_interval_s),
        pause, unpause, reboot, reset."""
        guests = self._guest_manager()
        if action not in GUEST_ACTIONS:
            raise InvalidInput("action", action, f"must be one of {sorted(GUEST_ACTIONS)}")
        if action == "softstop":
            given = options if isinstance(options, dict) else {}
            unknown = set(given) - {"timeout_s", "poll_interval_s"}
            if unknown or (options is not None and not isinstance(options, dict)):
                raise InvalidInput("options", options, "only timeout_s and poll_interval_s")
            guests.softstop(userid, **given)
        else:
            getattr(guests, action)(userid)
        return True

    def guest_power_state(self, userid: str) -> str:
        return str(self._guest_manager().power_state(userid))

    def guest_info(self, userid: str) -> dict[str, Any]:
        return _xmlrpc_safe(self._guest_manager().info(userid))

    def guest_definition(self, userid: str) -> str:
        return str(self._guest_manager().definition(userid))

    def guest_stats(self, userid: str) -> dict[str, Any]:
        return _xmlrpc_safe(self._guest_manager().stats(userid))

    def guest_host_info(self) -> dict[str, Any]:
        """The backend's host info, and ``bus``: this node's host_ip when the cluster
        controller's guest calls can come over the control bus, to the queue of that host
        (docs/bus.rst; the controller uses the bus only for the nodes that say so)."""
        info = dict(_xmlrpc_safe(self._guest_manager().host_info()))
        bus = getattr(self._virtman, "bus", None)
        if bus is not None and bus.serves_guests:
            info["bus"] = bus.host_ip
        return info

    def guest_console_output(self, userid: str) -> str:
        return str(self._guest_manager().console_output(userid))

    def guest_delete(self, userid: str) -> bool:
        self._guest_manager().delete(userid)
        return True

    def guest_orphans(self) -> builtins.list[str]:
        return list(self._guest_manager().orphans())

    # -- live migration (virtman.guest.migration; the cluster controller drives it) -----------
    def _migrations(self) -> Any:
        guests = self._guest_manager()
        if not hasattr(guests, "prepare_incoming"):
            raise VirtmanError("this node's guests cannot live-migrate (guest_backend)")
        return guests

    def guest_migrate_prepare(
        self, userid: str, vcpus: int, memory_mb: int, image: str
    ) -> dict[str, str]:
        """Destination: this node's stack for ``image`` and a new snapshot for the guest."""
        return dict(self._migrations().prepare_incoming(userid, vcpus, memory_mb, image))

    def guest_migrate(self, userid: str, incoming: Any) -> dict[str, Any]:
        """Source: live-migrate the guest to what ``guest_migrate_prepare`` answered."""
        return _xmlrpc_safe(self._migrations().migrate(userid, incoming))

    def guest_migrate_finish(self, userid: str) -> bool:
        self._migrations().finish_incoming(userid)
        return True

    def guest_migrate_abort(self, userid: str) -> str:
        return str(self._migrations().abort_incoming(userid))


GUEST_ACTIONS = frozenset({"start", "stop", "softstop", "pause", "unpause", "reboot", "reset"})


def _xmlrpc_safe(value: Any) -> Any:
    """XML-RPC integers are 32-bit: larger ones (CPU time in us) travel as strings."""
    if isinstance(value, dict):
        return {str(k): _xmlrpc_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_xmlrpc_safe(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 31:
        return str(value)
    return value


class Dispatcher(SimpleXMLRPCDispatcher):
    """The standard dispatcher, with a typed fault code for the errors a caller acts on
    (its fault string stays the standard ``"<class>:<message>"``; every other error is
    fault 1 as before)."""

    FAULT_CODES: dict[type[Exception], int] = {GuestNotFound: FAULT_GUEST_NOT_FOUND}

    def _dispatch(self, method: str, params: Any) -> Any:
        try:
            return super()._dispatch(method, params)
        except tuple(self.FAULT_CODES) as exc:
            code = self.FAULT_CODES[type(exc)]
            raise xmlrpc.client.Fault(code, f"{type(exc)}:{exc}") from None


def build_server(
    address: tuple[str, int],
    limits: Limits,
    virtman: Virtman,
    images: ImageService,
    ssl_context: ssl.SSLContext | None = None,
    guests: Any = None,
) -> Server:
    dispatcher = Dispatcher(allow_none=True, encoding=None)
    dispatcher.register_introspection_functions()
    dispatcher.register_instance(Methods(virtman, images, guests))
    return Server(address, dispatcher, limits, ssl_context)
