"""A small synchronous QMP client over a unix socket (no asyncio, no extra dependency).

One background thread reads the socket: replies are matched to requests by ``id`` and
asynchronous events are kept in a bounded buffer for ``wait_event``. Every caller-facing
method blocks, with a deadline. One lock (a ``Condition``) per client guards the socket and
both buffers, so several threads may call ``execute`` at once; QEMU runs the commands of one
monitor in the order they arrive.

Facts of QEMU 7.2 that shape this module:

- A chardev socket server (``server=on,wait=off``) serves ONE client at a time. A second
  client's ``connect`` succeeds (the kernel queues it) but no greeting comes until the first
  client disconnects, so a missing greeting is reported as a ``Timeout`` that says so.
- An event may arrive before the reply of the command that caused it (``block-export-del``
  sends ``BLOCK_EXPORT_DELETED`` first), so take ``event_mark()`` before the command and wait
  with ``after=mark``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from brick.closing import Closing
from brick.exception import BrickError, Timeout
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

Event = dict[str, Any]

# argument keys whose values never reach a log line (object-add secret "data", CHAP passwords)
_SECRET_KEYS = frozenset({"data", "password", "secret", "key"})
_MAX_LINE = 16 << 20  # a reply longer than this is a protocol error, not something to buffer


class QMPError(BrickError):
    """QEMU answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command, self.error_class, self.desc = command, error_class, desc
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")


class QMPDisconnected(BrickError):
    """The QMP connection is closed (the daemon exited, or ``close()`` was called)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"QMP connection {path} is closed: {reason}")


def masked(value: Any) -> Any:
    """A copy of QMP arguments fit for a log line: secret values replaced by ``***``."""
    if isinstance(value, Mapping):
        return {k: "***" if k in _SECRET_KEYS else masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


class QMPClient(Closing):
    """A connection to one QMP monitor socket.

    ``QMPClient(path).connect()`` reads the greeting and negotiates ``qmp_capabilities``.
    ``timeout_s`` is the default deadline of a command; ``max_events`` bounds the event buffer
    (the oldest events are dropped first).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout_s: float = 30.0,
        max_events: int = 1000,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout_s = timeout_s
        self.greeting: dict[str, Any] | None = None
        self._cond = threading.Condition(threading.Lock())
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._closed: str | None = "not connected"
        self._ids = itertools.count(1)
        self._replies: dict[str, dict[str, Any]] = {}
        self._abandoned: set[str] = set()
        self._events: collections.deque[tuple[int, Event]] = collections.deque(maxlen=max_events)
        self._event_seq = 0

    def __repr__(self) -> str:
        return f"QMPClient({self.path!r}, {'closed' if self._closed else 'open'})"

    # -- connection ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._closed is None

    @property
    def version(self) -> str:
        """``major.minor.micro`` of the QEMU on the other end (from the greeting)."""
        if not self.greeting:
            return ""
        v = self.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
        return f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}"

    def connect(self, *, timeout_s: float = 5.0) -> QMPClient:
        """Connect (retrying while the socket does not exist or refuses), read the greeting,
        send ``qmp_capabilities``. Raises ``Timeout`` if any step takes longer than
        ``timeout_s`` in all."""
        with self._cond:
            if self._closed is None:
                return self
        started = time.monotonic()

        def attempt() -> socket.socket | None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, timeout_s))
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                return None
            except OSError:
                sock.close()
                raise
            sock.settimeout(None)  # the reader thread blocks; deadlines live in the waiters
            return sock

        sock = wait_until(attempt, timeout_s=timeout_s, what=f"QMP socket {self.path} to accept")
        reader = threading.Thread(
            target=self._read_loop, args=(sock,), name=f"qmp-reader {self.path}", daemon=True
        )
        with self._cond:
            self._sock, self._reader, self._closed = sock, reader, None
            self.greeting = None
            self._replies.clear()
            self._abandoned.clear()
        reader.start()
        try:
            remaining = max(0.0, timeout_s - (time.monotonic() - started))
            with self._cond:
                got = self._cond.wait_for(
                    lambda: self.greeting is not None or self._closed is not None, remaining
                )
                if self._closed is not None:
                    raise QMPDisconnected(self.path, self._closed)
                if not got:
                    exc = Timeout(f"the QMP greeting on {self.path}", timeout_s)
                    exc.add_note("a QMP chardev serves one client at a time: another may hold it")
                    raise exc
            remaining = max(0.1, timeout_s - (time.monotonic() - started))
            self.call("qmp_capabilities", timeout_s=remaining)
        except BaseException:
            self.close()
            raise
        LOG.debug("QMP %s connected (QEMU %s)", self.path, self.version)
        return self

    def close(self) -> None:
        """Close the connection (idempotent); waiters get ``QMPDisconnected``."""
        with self._cond:
            sock, reader = self._sock, self._reader
            self._sock, self._reader = None, None
            if self._closed is None:
                self._closed = "closed by this client"
            self._cond.notify_all()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=5.0)

    # -- the reader thread ---------------------------------------------------------------
    def _read_loop(self, sock: socket.socket) -> None:
        buf = bytearray()
        reason = "the daemon closed the connection"
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while (end := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:end])
                    del buf[: end + 1]
                    if line.strip():
                        self._dispatch(json.loads(line))
                if len(buf) > _MAX_LINE:
                    reason = f"a QMP message exceeds {_MAX_LINE} bytes"
                    break
        except OSError as exc:
            reason = f"socket error: {exc}"
        except ValueError as exc:
            reason = f"QMP sent something that is not JSON: {exc}"
        with self._cond:
            if self._sock is sock and self._closed is None:
                self._closed = reason
                LOG.debug("QMP %s: %s", self.path, reason)
            self._cond.notify_all()

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._cond:
            if "event" in message:
                self._event_seq += 1
                self._events.append((self._event_seq, message))
                LOG.debug("QMP %s event %s %s", self.path, message["event"], message.get("data"))
            elif "QMP" in message:
                self.greeting = message
            elif isinstance(message.get("id"), str):
                req_id = message["id"]
                if req_id in self._abandoned:
                    self._abandoned.discard(req_id)
                else:
                    self._replies[req_id] = message
            else:
                LOG.warning("QMP %s: unexpected message %s", self.path, message)
            self._cond.notify_all()

    # -- commands ------------------------------------------------------------------------
    def execute(self, command: str, /, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value. QMP argument names contain
        dashes, so pass them as ``**{"node-name": ...}``. Raises ``QMPError`` on an error
        reply, ``Timeout`` after ``self.timeout_s``, ``QMPDisconnected`` if the link drops."""
        return self.call(command, arguments)

    def call(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Like ``execute``, with the arguments as a mapping and an explicit deadline."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        req_id = f"vmt-{next(self._ids)}"
        payload: dict[str, Any] = {"execute": command, "id": req_id}
        if arguments:
            payload["arguments"] = dict(arguments)
        data = json.dumps(payload).encode() + b"\n"
        started = time.monotonic()
        with self._cond:
            if self._closed is not None or self._sock is None:
                raise QMPDisconnected(self.path, self._closed or "not connected")
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise QMPDisconnected(self.path, f"send failed: {exc}") from None
            done = self._cond.wait_for(
                lambda: req_id in self._replies or self._closed is not None, timeout
            )
            reply = self._replies.pop(req_id, None)
            if reply is None:
                if done:  # closed before the reply came
                    raise QMPDisconnected(self.path, self._closed or "closed")
                self._abandoned.add(req_id)
                LOG.warning("QMP %s: no reply to %s in %g s", self.path, command, timeout)
                raise Timeout(f"QMP {command} on {self.path}", timeout)
        elapsed = time.monotonic() - started
        if "error" in reply:
            error = reply["error"]
            LOG.debug(
                "QMP %s %s %s -> %s in %.3f s",
                self.path,
                command,
                masked(arguments or {}),
                error.get("class"),
                elapsed,
            )
            raise QMPError(command, str(error.get("class")), str(error.get("desc")))
        LOG.debug(
            "QMP %s %s %s -> ok in %.3f s", self.path, command, masked(arguments or {}), elapsed
        )
        return reply.get("return")

    # -- events --------------------------------------------------------------------------
    def event_mark(self) -> int:
        """The sequence number of the newest event so far: pass it to ``wait_event(after=)``
        to ignore the events that came before."""
        with self._cond:
            return self._event_seq

    def events(self, name: str | None = None) -> list[Event]:
        """Take every buffered event (named ``name``, if given) out of the buffer."""
        with self._cond:
            taken = [e for _, e in self._events if name is None or e["event"] == name]
            kept = [(s, e) for s, e in self._events if not (name is None or e["event"] == name)]
            self._events.clear()
            self._events.extend(kept)
            return taken

    def wait_event(
        self,
        name: str,
        predicate: Callable[[Event], bool] | None = None,
        *,
        timeout_s: float = 10.0,
        after: int | None = None,
    ) -> Event:
        """Take the oldest buffered event ``name`` (newer than ``after``, accepted by
        ``predicate``) out of the buffer, waiting up to ``timeout_s`` for one to arrive.

        Raises ``Timeout`` if none comes, ``QMPDisconnected`` if the link drops first.
        """

        def find() -> tuple[int, Event] | None:
            for seq, event in self._events:
                if after is not None and seq <= after:
                    continue
                if event.get("event") == name and (predicate is None or predicate(event)):
                    return seq, event
            return None

        with self._cond:
            found: list[tuple[int, Event] | None] = [None]

            def ready() -> bool:
                found[0] = find()
                return found[0] is not None or self._closed is not None

            self._cond.wait_for(ready, timeout_s)
            hit = found[0]
            if hit is not None:
                self._events.remove(hit)
                return hit[1]
            if self._closed is not None:
                raise QMPDisconnected(self.path, self._closed)
        raise Timeout(f"QMP event {name} on {self.path}", timeout_s)


def connect(path: str | os.PathLike[str] | Path, *, timeout_s: float = 5.0) -> QMPClient:
    """``QMPClient(path).connect(timeout_s=timeout_s)``."""
    return QMPClient(path).connect(timeout_s=timeout_s)
