"""The WSGI application of the z/VM-shaped API: authentication, the request's query and
body, routing (``routes``) and the reply envelope (``envelope``, docs/zvm-api.rst).

Every request is authenticated first (``TokenAuth``; ``/token`` is the handshake), then
its path parameters, query and body are checked field by field (``validate``) before
anything on the node changes. Guest verbs call only ``GuestBackend``; images go through the
``Catalogue``; network interfaces are recorded in the ``Store``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from virtman.zvm.auth import TokenAuth
from virtman.zvm.backend import GuestBackend
from virtman.zvm.envelope import ApiError, envelope, error_of, failure, request_error
from virtman.zvm.images import Catalogue
from virtman.zvm.peer import PeerUids
from virtman.zvm.request import Context, Request
from virtman.zvm.routes import match
from virtman.zvm.store import Store

LOG = logging.getLogger(__name__)

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


class ZvmApi(Context):
    """The WSGI app: each request routed to its handler, given this node as ``Context``."""

    def __init__(
        self,
        backend: GuestBackend | None,
        catalogue: Catalogue,
        store: Store,
        *,
        auth: TokenAuth | None,
        disk_dir: Path,
        bridge: str = "virbr0",
        max_request_bytes: int = 1 << 20,
        host_info: Callable[[], dict[str, Any]] | None = None,
        peers: PeerUids | None = None,
    ) -> None:
        """``backend`` None: the guest manager is not available (guest verbs answer 501);
        ``host_info`` then answers ``host_get_info``. ``auth`` None: noauth. ``peers``: a
        loopback caller running as one of its uids needs no token (``zvm_api_auth = peer-uid``,
        for Nova's zvm driver, which sends none)."""
        super().__init__(
            backend, catalogue, store, disk_dir=disk_dir, bridge=bridge, host_info=host_info
        )
        self.auth = auth
        self.max_request_bytes = max_request_bytes
        self.peers = peers

    # -- WSGI --------------------------------------------------------------------------------
    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        headers: list[tuple[str, str]] = []
        try:
            status, output, headers = self._handle(environ, method, path)
            body = envelope(output)
        except ApiError as err:
            status, headers = err.status, err.headers
            body = failure(err)
            log = LOG.warning if err.status < 500 else LOG.error
            log("z/VM API: %s %s -> %d: %s", method, path[:120], err.status, err.errmsg)
        except Exception as exc:  # a bug of ours: answered in the envelope, logged whole
            LOG.exception("z/VM API: %s %s failed", method, path[:120])
            status, headers = 500, []
            why = f"Unexpected internal error: {type(exc).__name__}: {exc}"
            body = failure(ApiError(500, 500, 500, 1, None, why))
        data = json.dumps(body).encode()
        start_response(
            f"{status} {REASONS.get(status, 'Error')}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Cache-Control", "no-cache"),
                *headers,
            ],
        )
        return [data]

    def _handle(
        self, environ: dict[str, Any], method: str, path: str
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        handlers, params = match(path)
        if handlers is None:
            raise request_error(404, f"The resource could not be found: {path[:120]}")
        if path == "/token":
            if method != "POST":
                raise _not_allowed(["POST"])
            return self._token(environ)
        if self.auth is not None and not self._authorized(environ):
            raise request_error(401, "Not authorized to execute (X-Auth-Token missing or wrong)")
        handler = handlers.get(method)
        if handler is None:
            raise _not_allowed(sorted(handlers))
        request = Request(method, path, _query(environ), self._body(environ), params, environ)
        try:
            return 200, handler(self, request), []
        except ApiError:
            raise
        except Exception as exc:
            mapped = error_of(exc)
            if mapped is None:
                raise
            raise mapped from None

    def _authorized(self, environ: dict[str, Any]) -> bool:
        assert self.auth is not None
        if self.auth.check(environ.get("HTTP_X_AUTH_TOKEN")):
            return True
        return self.peers is not None and self.peers.allows(
            environ.get("vmt.peer"), environ.get("vmt.local")
        )

    def _token(self, environ: dict[str, Any]) -> tuple[int, Any, list[tuple[str, str]]]:
        if self.auth is None:
            return 200, None, [("X-Auth-Token", "server-auth-closed")]
        token = self.auth.issue(environ.get("HTTP_X_ADMIN_TOKEN"))
        if token is None:
            raise request_error(401, "Not authorized to execute (X-Admin-Token missing or wrong)")
        return 200, None, [("X-Auth-Token", token)]

    def _body(self, environ: dict[str, Any]) -> Any:
        length_text = environ.get("CONTENT_LENGTH") or "0"
        if not length_text.isascii() or not length_text.isdigit():
            raise request_error(
                400, f"content-length header must be an integer: {length_text!r:.40}"
            )
        length = int(length_text)
        if length > self.max_request_bytes:
            raise request_error(
                413, f"body of {length} bytes (max_request_bytes {self.max_request_bytes})"
            )
        if length == 0:
            return None
        try:
            raw = environ["wsgi.input"].read(length)
        except OSError as exc:  # e.g. the client stalled past request_timeout
            raise request_error(400, f"body not received: {exc}") from None
        if len(raw) != length:
            raise request_error(400, f"body of {len(raw)} bytes, Content-Length {length}")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise request_error(400, f"Malformed JSON: {exc}") from None


def _not_allowed(methods: list[str]) -> ApiError:
    err = request_error(405, "The method specified is not allowed for this resource.")
    err.headers = [("Allow", ", ".join(methods))]
    return err


def _query(environ: dict[str, Any]) -> dict[str, list[str]]:
    text = environ.get("QUERY_STRING", "")
    try:
        return parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=16)
    except ValueError as exc:
        raise request_error(400, f"bad query string: {exc}") from None
