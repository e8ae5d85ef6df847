"""Volt as a node sees it, in memory: joins answer with the parents a test sets; calls are
recorded."""

from __future__ import annotations

from virtman.errors import ParentsUnavailable
from virtman.layers.base import Relay
from voltclient.client import Volume
from voltclient.exceptions import VoltClientError


def ready(host: str, image: str, nbd: str | None = "10809") -> Volume:
    iqn = f"iqn.2010-10.org.openstack:{image}"
    return Volume(host, "3260", iqn, "1", "OK", f"{host}:{image}", nbd)


class FakeVolt:
    """Volt as the node sees it: joins answer with ``parents``; calls are recorded."""

    def __init__(self, host_ip: str = "10.0.0.9") -> None:
        self.host_ip = host_ip
        self.parents: dict[str, list[Volume]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.known: dict[str, str] = {}  # peer_id -> image
        # what a register answers as the node's parents (absent: None, as the original's)
        self.registered_parents: dict[str, list[Volume]] = {}
        self.down = False  # unreachable: every call fails as the real link's do
        self.places = True  # registers place the node (False: a btree Volt, or the original)
        self.bytes_read: list[dict[str, object]] | None = None  # the last heartbeat's

    def _reach(self, what: str) -> None:
        if self.down:
            self.calls.append(("unreachable", what))
            raise VoltClientError(None, None, f"{what}: connection refused")

    def join(
        self, image: str, *, timeout_s: float, quiet: bool = False
    ) -> tuple[str, list[Volume]]:
        if self.down:
            self.calls.append(("unreachable", "join"))
            raise ParentsUnavailable(image, timeout_s)
        peer_id = f"{self.host_ip}:{image}"
        self.calls.append(("join", image))
        self.known[peer_id] = image
        return peer_id, self.parents.get(image, [])

    def register(self, image: str, peer_id: str, relay: Relay) -> list[Volume] | None:
        self._reach("register")
        self.calls.append(("register", image, peer_id, relay.nbd or ""))
        return self.registered_parents.get(image)

    def place_and_register(self, image: str, relay: Relay) -> tuple[str, list[Volume]] | None:
        self._reach("place_and_register")
        if not self.places:
            self.calls.append(("not_placed", image))
            return None
        peer_id = f"{self.host_ip}:{image}"
        self.calls.append(("place_and_register", image, peer_id, relay.nbd or ""))
        self.known[peer_id] = image
        return peer_id, self.registered_parents.get(image, self.parents.get(image, []))

    def leave(self, image: str, peer_id: str) -> None:
        self._reach("leave")
        self.calls.append(("leave", image, peer_id))
        self.known.pop(peer_id, None)

    def report_dead_parent(self, image: str, peer_id: str, parent: str) -> str:
        self._reach("report_dead_parent")
        self.calls.append(("report_dead_parent", image, peer_id, parent))
        return "checking"

    def heartbeat(
        self, bytes_read: list[dict[str, object]] | None = None
    ) -> dict[str, list[Volume]]:
        self._reach("heartbeat")
        self.calls.append(("heartbeat",))
        self.bytes_read = bytes_read
        return {p: self.parents.get(image, []) for p, image in self.known.items()}
