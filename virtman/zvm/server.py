"""The HTTP(S) server of the z/VM-shaped API: the standard library's WSGI server, bounded.

* at most ``connections`` requests are served at once, one thread each; one more
  connection is answered 503 (in the envelope) and closed, without a thread;
* every socket has ``request_timeout`` seconds per read or write (TLS handshake, headers,
  body, answer); a silent client loses its connection and frees its thread;
* one request per connection (HTTP/1.0 answers, ``Connection: close``), as zvmconnector
  (``requests``) copes with;
* TLS: the handshake runs in the request's thread, never in the accepting one.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import ssl
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

LOG = logging.getLogger(__name__)


class _Handler(WSGIRequestHandler):
    server_version = "virtman-zvm"

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("z/VM API: %s %s", self.address_string(), format % args)

    def get_stderr(self) -> Any:
        return _LogStream()


class _LogStream:
    """wsgiref writes an application's traceback here: into the log instead."""

    def write(self, text: str) -> None:
        if text.strip():
            LOG.error("z/VM API: %s", text.rstrip())

    def flush(self) -> None:
        pass


class ZvmServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        app: Any,
        *,
        connections: int = 16,
        request_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.slots = threading.BoundedSemaphore(connections)
        self.request_timeout = request_timeout
        self.ssl_context = ssl_context
        super().__init__(address, _Handler)
        self.set_app(app)
        self.thread: threading.Thread | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        sock.settimeout(self.request_timeout)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            LOG.warning("z/VM API: refused %s: all connections busy", client_address[0])
            if self.ssl_context is None:
                _answer_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.ssl_context is not None:
                try:
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    LOG.warning("z/VM API: TLS handshake with %s: %s", client_address[0], exc)
                    request.close()
                    return
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.warning("z/VM API: connection from %s failed", client_address[0], exc_info=True)

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Serve in a daemon thread."""
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="zvm-api", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.shutdown()
            self.thread.join()
        self.server_close()

    @property
    def url(self) -> str:
        address = self.server_address
        host, port = str(address[0]), int(address[1])
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}"


def _answer_busy(sock: socket.socket) -> None:
    body = json.dumps(
        {
            "overallRC": 503,
            "rc": 503,
            "rs": 1,
            "modID": 120,
            "output": "",
            "errmsg": "z/VM API busy: all connections in use (zvm_api_connections)",
        }
    ).encode()
    head = (
        "HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        sock.settimeout(0)
        sock.send(head.encode() + body)
    except OSError:
        pass
