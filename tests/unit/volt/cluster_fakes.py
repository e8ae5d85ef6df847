"""In-process stand-ins for the cluster controller's tests: fake nodes and an RSGI driver."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from virtmanclient.exceptions import FAULT_GUEST_NOT_FOUND, RemoteFault
from volt.cluster.nodes import NodeEndpoint


class NodeDown(OSError):
    pass


class FakeNode:
    """A virtmanserver's guest API in memory; ``fail`` = the method that raises;
    ``backend``: what its host info says runs its guests (``vcenter``), or nothing."""

    def __init__(
        self, node_id: str, vcpus: int = 4, memory_mb: int = 4096, backend: str | None = None
    ) -> None:
        port = 7000 + int(node_id[1:])
        self.endpoint = NodeEndpoint(node_id, f"http://127.0.0.1:{port}/RPC2")
        self.vcpus, self.memory_mb = vcpus, memory_mb
        self.backend = backend  # None: says none, as a libvirt node does
        self.guests: dict[str, dict[str, Any]] = {}
        self.fail: str | None = None
        self.on_bus: str | None = None  # the host_ip its host info says it takes bus calls on
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def call(self, method: str, *args: Any) -> Any:
        with self.lock:
            self.calls.append(method)
            if self.fail in (method, "*"):
                raise NodeDown(f"{self.endpoint.id} is down")
            if method == "guest_host_info":
                info = {"hypervisor_hostname": "fake", "vcpus": self.vcpus,
                        "memory_mb": self.memory_mb, "vcpus_used": 0}  # fmt: skip
                if self.on_bus:
                    info["bus"] = self.on_bus
                return info if self.backend is None else {**info, "backend": self.backend}
            userid = args[0]
            if method == "guest_create":
                self.guests[userid] = {"state": "off", "vcpus": args[1], "memory_mb": args[2]}
            elif method == "guest_deploy":
                self.guests[userid]["image"] = args[1]
            elif method == "guest_action":
                states = {"start": "on", "stop": "off", "softstop": "off", "pause": "paused",
                          "unpause": "on", "reboot": "on"}  # fmt: skip
                if userid not in self.guests:
                    raise RuntimeError(f"guest {userid} does not exist")
                self.guests[userid]["state"] = states[args[1]]
            elif method == "guest_power_state":  # a real node says "off" for a guest
                if userid not in self.guests:  # with no domain: one still arriving, say
                    raise not_found("guest_power_state", userid)
                state = self.guests[userid]["state"]
                return "off" if state == "incoming" else state
            elif method == "guest_migrate_prepare":
                if userid in self.guests:
                    raise RuntimeError(f"guest {userid} exists already")
                self.guests[userid] = {"state": "incoming", "vcpus": args[1],
                                       "memory_mb": args[2], "image": args[3]}  # fmt: skip
                return {"disk": f"/{self.endpoint.id}/{userid}.qcow2"}
            elif method == "guest_migrate":  # the incoming disk must be the destination's
                assert args[1]["disk"].endswith(f"/{userid}.qcow2"), args
                del self.guests[userid]
                return {"disk_bytes": str(16 << 20), "memory_bytes": 90 << 20, "seconds": 3.5}
            elif method == "guest_migrate_finish":
                self.guests[userid]["state"] = "on"
            elif method == "guest_migrate_abort":
                if self.guests.get(userid, {}).get("state") == "incoming":
                    del self.guests[userid]
                return "removed"
            elif method == "guest_delete":
                if userid not in self.guests:
                    raise not_found("guest_delete", userid)
                del self.guests[userid]
            return True


def not_found(method: str, userid: str) -> RemoteFault:
    """What virtmanclient raises for a node's GuestNotFound (virtman.server.Dispatcher)."""
    text = f"<class 'virtman.errors.GuestNotFound'>:Virtman: the guest '{userid}' does not exist"
    return RemoteFault(method, FAULT_GUEST_NOT_FOUND, text)


def client_factory(nodes: dict[str, FakeNode]) -> Any:
    return lambda endpoint, timeout: nodes[endpoint.id]


class _Headers(dict):
    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


class _Scope:
    def __init__(self, method: str, path: str, query: str, headers: dict[str, str]) -> None:
        self.method, self.path, self.query_string = method, path, query
        self.headers = _Headers({k.lower(): v for k, v in headers.items()})
        self.client = "127.0.0.1:40000"


class _Protocol:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.payload = b""

    def __aiter__(self) -> Any:
        async def chunks() -> Any:
            if self.body:
                yield self.body

        return chunks()

    def response_bytes(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
        self.status, self.headers, self.payload = status, headers, payload

    def response_empty(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status, self.headers = status, headers


def call(
    app: Any, method: str, url: str, body: Any = None, *, raw: bytes | None = None,
    token: str | None = "admin",
) -> tuple[int, Any, str]:  # fmt: skip
    """One request through the app's RSGI entry: (status, parsed JSON or text, type)."""
    path, _, query = url.partition("?")
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    headers = {"content-type": "application/json", "content-length": str(len(data))}
    if token:
        headers["x-auth-token"] = token
    protocol = _Protocol(data)
    asyncio.run(app.__rsgi__(_Scope(method, path, query, headers), protocol))
    kind = dict(protocol.headers).get("Content-Type", "")
    if kind == "application/json" and protocol.payload:
        return protocol.status, json.loads(protocol.payload), kind
    return protocol.status, protocol.payload.decode(), kind
