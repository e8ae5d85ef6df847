"""The request object handlers receive, and the response they return."""

from __future__ import annotations

import json
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from volt.auth import ADMIN, Credential
from volt.errors import BodyTimeout, BodyTooLarge, MalformedBody

MAX_BODY_BYTES = 64 * 1024
# Threads that wait on client sockets for bodies. A client that stalls past the deadline
# keeps one until it closes its connection (Granian cannot drop a body being read), never a
# worker: workers wait with a deadline.
BODY_READERS = 64
# Unfinished bodies one caller (a node token's host, else the source address) may leave; past it
# its next body requests get 408 at once, so one caller cannot take every reader thread.
STALLED_PER_CALLER = 4


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    remote_addr: str
    headers: dict[str, str]
    body: Any = None  # parsed JSON, or None when there was no body
    request_id: str = ""
    credential: Credential = ADMIN


@dataclass
class Response:
    status: int
    body: Any = None  # JSON-serialisable; None = empty body
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes | None = None  # pre-encoded body (metrics, documents)
    content_type: str = "application/json"


def has_body(environ: dict[str, Any]) -> bool:
    """Whether the request announces a body (which may never come)."""
    length = environ.get("CONTENT_LENGTH") or ""
    return length not in ("", "0") or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


class BodyReader:
    """Reads request bodies with a deadline.

    Granian's ``wsgi.input.read`` blocks the calling thread until the bytes arrive, with no
    timeout of its own (Granian 2.8 only bounds the header read). So the read runs in a
    thread of this small pool and the worker waits at most ``timeout`` seconds for it; a
    client that stalls gets 408 and its connection is closed.
    """

    def __init__(self, timeout: float, threads: int = BODY_READERS) -> None:
        self.timeout = timeout
        self.pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="volt-body")
        self.stalled: dict[str, int] = {}  # caller -> reads that outlived their deadline
        self._lock = threading.Lock()

    def read_json(self, environ: dict[str, Any], caller: str) -> Any:
        """The JSON body, or None if there is none. ``caller`` names whose stalled reads
        count against STALLED_PER_CALLER."""
        length_header = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not length_header and not chunked:
            return None
        try:
            length = int(length_header) if length_header else -1
        except ValueError:
            raise MalformedBody("Content-Length is not a number") from None
        if length == 0:
            return None
        if length > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        with self._lock:
            if self.stalled.get(caller, 0) >= STALLED_PER_CALLER:
                raise BodyTimeout(
                    f"{STALLED_PER_CALLER} earlier bodies of this caller never arrived; "
                    "close those connections"
                )
        stream = environ["wsgi.input"]
        pending = self.pool.submit(stream.read, length if length > 0 else MAX_BODY_BYTES + 1)
        try:
            raw = pending.result(timeout=self.timeout)
        except futures.TimeoutError:
            if not pending.cancel():  # the reader waits on the socket: count it until done
                with self._lock:
                    self.stalled[caller] = self.stalled.get(caller, 0) + 1
                pending.add_done_callback(lambda _: self._finished(caller))
            raise BodyTimeout(
                f"the request body did not arrive within {self.timeout:g} s"
            ) from None
        if length > 0 and len(raw) < length:
            raise MalformedBody(f"the body ended after {len(raw)} of {length} bytes")
        return parse_json(raw)

    def _finished(self, caller: str) -> None:
        with self._lock:
            left = self.stalled.get(caller, 1) - 1
            if left > 0:
                self.stalled[caller] = left
            else:
                self.stalled.pop(caller, None)


def parse_json(raw: bytes) -> Any:
    """Parse a body already read; only JSON whitespace is the same as no body."""
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    if not raw.strip(b" \t\r\n"):
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 30000 nested arrays: fits in the size limit, not the stack
        raise MalformedBody("request body is nested too deeply") from None
