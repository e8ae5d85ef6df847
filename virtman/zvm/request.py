"""What a z/VM API handler is given: the parsed ``Request`` and the ``Context`` of the node it
acts on (guest manager, image catalogue, NIC store), apart from the WSGI layer so the handler
modules need not import the app that routes to them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtman.errors import GuestNotFound, InvalidInput
from virtman.zvm.backend import GuestBackend
from virtman.zvm.envelope import MOD_GUEST, not_supported
from virtman.zvm.images import Catalogue
from virtman.zvm.store import Store


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # parsed JSON, or None without a body
    params: dict[str, str]
    environ: dict[str, Any]

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        if values is None:
            return None
        if len(values) != 1:
            raise InvalidInput(name, values, "give it once")
        return values[0]

    def only_query(self, *names: str) -> None:
        unknown = sorted(set(self.query) - set(names))
        if unknown:
            raise InvalidInput("query", unknown, f"unknown parameters (allowed: {names or '-'})")

    def no_body(self) -> None:
        if self.body not in (None, {}):
            raise InvalidInput("body", self.body, "this request takes no body")


class Context:
    """The node's parts a handler uses."""

    def __init__(
        self,
        backend: GuestBackend | None,
        catalogue: Catalogue,
        store: Store,
        *,
        disk_dir: Path,
        bridge: str,
        host_info: Callable[[], dict[str, Any]] | None,
    ) -> None:
        """``backend`` None: the guest manager is not available (guest verbs answer 501);
        ``host_info`` then answers ``host_get_info``."""
        self.backend = backend
        self.catalogue = catalogue
        self.store = store
        self.disk_dir = disk_dir
        self.bridge = bridge
        self.host_info = host_info

    def guests(self) -> GuestBackend:
        if self.backend is None:
            raise not_supported("guests (the guest manager is not running on this node)", MOD_GUEST)
        return self.backend

    def known(self, userid: str) -> str:
        """``userid`` if the guest exists (``GuestNotFound`` otherwise)."""
        if userid not in self.guests().list():
            raise GuestNotFound(userid)
        return userid

    def diskpool(self) -> dict[str, int]:
        where = self.disk_dir
        while not where.exists() and where != where.parent:  # the cache dir is made later
            where = where.parent
        usage = shutil.disk_usage(where)
        gib = 1 << 30
        return {
            "disk_total": usage.total // gib,
            "disk_used": (usage.total - usage.free) // gib,
            "disk_available": usage.free // gib,
        }


Handler = Callable[[Context, Request], Any]
