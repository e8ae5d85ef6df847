"""The RSGI application: routing, authentication, errors as JSON, request metrics.

The route table is the single place that lists the API; /openapi.json documents it.
Order of work on every request: route (404/405), authenticate (401), authorise (403), and
only then read the body, on the operations that take one, with a deadline (408).

Granian's RSGI interface, not WSGI: a WSGI ``wsgi.input.read`` blocks a worker thread with
no deadline (Granian 2.8 bounds only the header read), and a read abandoned in another
thread hangs the whole server. Here the event loop reads bodies (``asyncio.wait_for``: a
stalled body occupies no thread, and its connection is closed with the 408), then runs the
handler itself: handlers are serialised on the service's lock anyway, and a hop to a thread
pool cost 40% of the throughput (bench/volt_load.py). A handler's store writes are not made
in it: they join the service's open batch, written in one transaction once every request
ready now has run (group commit, volt/service.py), and only then is the answer sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from prometheus_client import exposition

from brick import values
from volt.api.handlers import Handlers
from volt.api.request import MAX_BODY_BYTES, Request, Response, parse_json
from volt.auth import ADMIN, Authenticator, Credential
from volt.cluster.api import ClusterHandlers
from volt.cluster.controller import Controller
from volt.deathwatch import DeathWatch
from volt.errors import (
    BodyTimeout,
    BodyTooLarge,
    MalformedBody,
    MethodNotAllowed,
    RouteNotFound,
    VoltError,
)
from volt.liveness import LoadMonitor
from volt.metrics import Metrics
from volt.service import VoltService

LOG = logging.getLogger(__name__)

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
Handler = Callable[[Request], Response]


def route_table(h: Handlers, app: VoltApp) -> list[tuple[str, dict[str, Handler]]]:
    """(path template, {method: handler}); the first template that matches wins."""
    return [
        ("/", {"GET": app.versions}),
        ("/metrics", {"GET": app.metrics_text}),
        ("/openapi.json", {"GET": app.openapi}),
        ("/v1/volumes", {"GET": h.list_volumes}),
        ("/v1/volumes/query/{volume_id}", {"GET": h.query}),
        (
            "/v1/volumes/{volume_id}",
            {"GET": h.show_volume, "HEAD": h.show_volume, "DELETE": h.delete_volume},
        ),
        ("/v1/volumes/{volume_id}/{peer_id}", {"POST": h.register, "DELETE": h.leave}),
        ("/v1/volumes/{volume_id}/{peer_id}/dead-parent", {"POST": h.dead_parent}),
        ("/v1/members", {"GET": h.list_members}),
        ("/v1/members/heartbeat", {"PUT": h.heartbeat}),
        *cluster_routes(app),
    ]


def cluster_routes(app: VoltApp) -> list[tuple[str, dict[str, Handler]]]:
    """The cluster controller's operations (docs/cluster.rst), when it is configured."""
    if app.cluster is None:
        return []
    c = ClusterHandlers(app.cluster, app.service)
    return [
        ("/status", {"GET": c.page}),  # the live status page (docs/cluster.rst)
        ("/status/{name}", {"GET": c.page_file}),
        ("/v1/status", {"GET": c.status}),
        ("/v1/clusters", {"POST": c.create}),
        ("/v1/clusters/{task_id}", {"GET": c.show, "DELETE": c.delete}),
        ("/v1/vms/{vm_id}", {"GET": c.show_vm}),
        ("/v1/vms/{vm_id}/action", {"POST": c.vm_action}),
        ("/v1/vms/{vm_id}/migrate", {"POST": c.migrate}),
        ("/v1/nodes", {"GET": c.nodes}),
        ("/groupmanager", {"POST": c.groupmanager}),  # Snooze: ?startVirtualCluster ...
        # Snooze: GET ?getLocalControllerList, POST the per-VM ...VirtualMachine verbs
        ("/bootstrap", {"GET": c.bootstrap, "POST": c.bootstrap_vm}),
    ]


# Readable without a credential; they never read a body. The status page's files hold no
# data: the page asks for the admin token and sends it to /v1/status in a header.
OPEN_PATHS = frozenset({"/", "/openapi.json", "/status", "/status/{name}"})
# (method, template) of the operations only the admin credential may call.
ADMIN_ONLY = frozenset(
    {
        ("GET", "/v1/volumes/{volume_id}"),
        ("HEAD", "/v1/volumes/{volume_id}"),
        ("DELETE", "/v1/volumes/{volume_id}"),
        ("GET", "/v1/members"),
        ("POST", "/v1/clusters"),
        ("GET", "/v1/clusters/{task_id}"),
        ("DELETE", "/v1/clusters/{task_id}"),
        ("GET", "/v1/vms/{vm_id}"),
        ("POST", "/v1/vms/{vm_id}/action"),
        ("POST", "/v1/vms/{vm_id}/migrate"),
        ("GET", "/v1/nodes"),
        ("POST", "/groupmanager"),
        ("GET", "/bootstrap"),
        ("POST", "/bootstrap"),
        ("GET", "/v1/status"),
    }
)
# The only operations whose body is read; every other one ignores a body it is sent.
TAKES_BODY = frozenset(
    {
        ("GET", "/v1/volumes/query/{volume_id}"),
        ("POST", "/v1/volumes/{volume_id}/{peer_id}"),
        ("PUT", "/v1/members/heartbeat"),
        ("POST", "/v1/volumes/{volume_id}/{peer_id}/dead-parent"),
        ("POST", "/v1/clusters"),
        ("POST", "/v1/vms/{vm_id}/action"),
        ("POST", "/v1/vms/{vm_id}/migrate"),
    }
)
# Operations whose body reaches the handler as bytes (Snooze sends a bare task id).
TAKES_RAW_BODY = frozenset({("POST", "/groupmanager"), ("POST", "/bootstrap")})


def _match(want: list[str], path: str) -> dict[str, str] | None:
    """Match a split template (``["", "v1", "{volume_id}"]``) against ``path``."""
    got = path.split("/")
    if len(want) != len(got):
        return None
    params = {}
    for w, g in zip(want, got, strict=True):
        if w.startswith("{"):
            if not g:
                return None
            params[w[1:-1]] = g
        elif w != g:
            return None
    return params


def _query(scope: Any) -> str:
    """The raw query string (Snooze names its methods there: ``?startVirtualCluster``)."""
    return str(getattr(scope, "query_string", "") or "")


def _announces_body(headers: Any) -> bool:
    length = headers.get("content-length") or ""
    chunked = "chunked" in (headers.get("transfer-encoding") or "").lower()
    return length not in ("", "0") or chunked


def _client_address(client: str) -> str:
    """The address part of RSGI's ``"host:port"`` (``"[v6]:port"`` or ``"v6:port"``)."""
    host = client.rpartition(":")[0] if ":" in client else client
    return values.unbracket(host)


async def _collect(protocol: Any) -> bytes:
    chunks, size = [], 0
    async for chunk in protocol:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_body(err: VoltError, request_id: str) -> dict[str, Any]:
    return {
        "errors": [
            {
                "status": err.status,
                "code": err.code,
                "title": err.title,
                "detail": err.detail,
                "request_id": request_id,
            }
        ]
    }


class VoltApp:
    def __init__(
        self,
        service: VoltService,
        *,
        auth_token: str | None,
        node_secret: str | None = None,
        metrics: Metrics | None = None,
        metrics_public: bool = False,
        body_timeout: float = 5.0,
        monitor: LoadMonitor | None = None,
        cluster: Controller | None = None,
        deathwatch: DeathWatch | None = None,
    ) -> None:
        self.service = service
        # children's reports of dead parents (volt/deathwatch.py; the bus's too)
        self.deathwatch = deathwatch or DeathWatch(service)
        self.cluster = cluster
        self.auth = Authenticator(auth_token, node_secret)
        self.metrics_public = metrics_public
        self.body_timeout = body_timeout
        self.monitor = monitor or LoadMonitor()
        self._probe: asyncio.Task[None] | None = None
        self.metrics_ = metrics or service.metrics
        self.routes = [
            (template, template.split("/"), methods)
            for template, methods in route_table(Handlers(service, self.deathwatch), self)
        ]
        self._observers: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._openapi = resources.files("volt.api").joinpath("openapi.json").read_bytes()

    # -- RSGI ------------------------------------------------------------------------------
    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """At worker start: the probe that tells the evictor when the loop is blocked."""
        self._probe = loop.create_task(self.monitor.probe())

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        started = time.perf_counter()
        request_id = "req-" + os.urandom(16).hex()
        method = scope.method.upper()
        path = scope.path or "/"  # Granian percent-decodes it
        headers = scope.headers
        announced = _announces_body(headers)
        route = "unmatched"
        body_read = False
        try:
            route, handler, params = self._route(method, path)
            credential = self._authenticate(route, headers.get("x-auth-token") or "")
            if (method, route) in ADMIN_ONLY:
                credential.require_admin(f"{method} {route}")
            body = None
            if (method, route) in TAKES_BODY and announced:
                body = await self._read_body(protocol, headers)
                body_read = True
            elif (method, route) in TAKES_RAW_BODY and announced:
                body = await self._read_body(protocol, headers, raw=True)
                body_read = True
            req = Request(
                method=method,
                path=path,
                params=params,
                remote_addr=_client_address(scope.client),
                headers={},
                body=body,
                request_id=request_id,
                credential=credential,
                query=_query(scope),
            )
            # Group commit: the answer waits until what the handler changed or saw is
            # written, while the requests already received join the same transaction.
            with self.service.deferred_commit() as unwritten:
                response = handler(req)
            if unwritten:
                await self.service.committed(unwritten)
        except VoltError as err:
            response = self._error(err, method, path, request_id)
        except Exception:
            LOG.exception("%s %s failed [%s]", method, path, request_id)
            internal = VoltError("internal error; see the volt-api log for " + request_id)
            response = Response(500, _error_body(internal, request_id))
        payload = self._encode(response)
        out = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(payload))),
            ("X-Request-Id", request_id),
            *response.headers,
        ]
        if announced and not body_read:
            # A body nobody reads (perhaps one that never comes) must not keep the
            # connection: it is closed once the answer is out.
            out.append(("Connection", "close"))
        if method == "HEAD":
            protocol.response_empty(response.status, out)
        else:
            protocol.response_bytes(response.status, out, payload)
        counter, histogram = self._observer(method, route, response.status)
        counter.inc()
        histogram.observe(time.perf_counter() - started)

    @staticmethod
    def _error(err: VoltError, method: str, path: str, request_id: str) -> Response:
        response = Response(err.status, _error_body(err, request_id))
        if isinstance(err, MethodNotAllowed):
            response.headers.append(("Allow", ", ".join(err.allowed)))
        level = logging.WARNING if err.status >= 500 else logging.INFO
        LOG.log(level, "%s %s -> %d %s [%s]", method, path, err.status, err.detail, request_id)
        return response

    async def _read_body(self, protocol: Any, headers: Any, raw: bool = False) -> Any:
        """The JSON body (``raw``: the bytes), read within ``body_timeout`` and at most
        MAX_BODY_BYTES."""
        length_header = headers.get("content-length") or ""
        if length_header:
            try:
                length = int(length_header)
            except ValueError:
                raise MalformedBody("Content-Length is not a number") from None
            if length > MAX_BODY_BYTES:
                raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
        try:
            body = await asyncio.wait_for(_collect(protocol), self.body_timeout)
        except TimeoutError:
            raise BodyTimeout(
                f"the request body did not arrive within {self.body_timeout:g} s"
            ) from None
        return body if raw else parse_json(body)

    def _observer(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        """The metric children of one (method, route, status), looked up once: labels() is
        slow. Keys are bounded: routes are templates, methods and statuses the few known."""
        if method not in KNOWN_METHODS:
            method = "other"
        key = (method, route, status)
        found = self._observers.get(key)
        if found is None:
            found = (
                self.metrics_.requests.labels(method, route, str(status)),
                self.metrics_.latency.labels(method, route),
            )
            self._observers[key] = found
        return found

    def _route(self, method: str, path: str) -> tuple[str, Handler, dict[str, str]]:
        for template, parts, methods in self.routes:
            params = _match(parts, path)
            if params is None:
                continue
            handler = methods.get(method)
            if handler is None:
                continue
            return template, handler, params
        matching = [methods for _, parts, methods in self.routes if _match(parts, path) is not None]
        allowed = sorted({m for methods in matching for m in methods})
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {path}", allowed)
        raise RouteNotFound(f"no such resource: {path}")

    def _authenticate(self, route: str, token: str) -> Credential:
        if route in OPEN_PATHS or (route == "/metrics" and self.metrics_public):
            return ADMIN
        return self.auth.authenticate(token)

    @staticmethod
    def _encode(response: Response) -> bytes:
        if response.raw is not None:
            return response.raw
        if response.body is None:
            return b""
        return json.dumps(response.body).encode()

    # -- unversioned resources -------------------------------------------------------------
    def versions(self, req: Request) -> Response:
        return Response(
            300,
            {
                "versions": [
                    {
                        "id": "v1.0",
                        "status": "CURRENT",
                        "links": [{"rel": "self", "href": "/v1/"}],
                    }
                ]
            },
        )

    def metrics_text(self, req: Request) -> Response:
        return Response(
            200,
            raw=exposition.generate_latest(self.metrics_.registry),
            content_type=exposition.CONTENT_TYPE_LATEST,
        )

    def openapi(self, req: Request) -> Response:
        return Response(200, raw=self._openapi)
