"""The nodes the controller dispatches to: a JSON file of virtmanserver endpoints.

``[cluster] nodes_file`` holds a list of objects::

    [{"id": "node1", "url": "http://10.0.0.5:7774/RPC2", "token": "<api_token>",
      "vcpus": 8, "memory_mb": 16384}]

``id``: 1-64 of ``[A-Za-z0-9._-]``; ``url``: the node's virtmanserver; ``token``: its
``api_token`` (omit for a noauth node); ``vcpus`` / ``memory_mb`` (optional): cap what the
controller places there below what the node's ``guest_host_info`` reports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from virtmanclient import Client

NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
INFO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NodeEndpoint:
    id: str
    url: str
    token: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url if "//" in self.url else f"http://{self.url}")
        return parts.hostname or "", parts.port or 7774

    def client(self, timeout: float) -> Client:
        return Client(self.url, token=self.token, timeout=timeout)


def parse_nodes(data: Any) -> list[NodeEndpoint]:
    """The endpoints of a parsed nodes file; ``ValueError`` naming the bad entry."""
    if not isinstance(data, list):
        raise ValueError("the nodes file must hold a JSON list")
    found: dict[str, NodeEndpoint] = {}
    for i, entry in enumerate(data):
        where = f"node #{i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = set(entry) - {"id", "url", "token", "vcpus", "memory_mb"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        node_id, url = entry.get("id"), entry.get("url")
        if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
            raise ValueError(f"{where}: id must be 1-64 of A-Z a-z 0-9 . _ -")
        if node_id in found:
            raise ValueError(f"{where}: id {node_id!r} appears twice")
        if not isinstance(url, str) or not url:
            raise ValueError(f"{where} ({node_id}): url is required")
        token = entry.get("token")
        if token is not None and not isinstance(token, str):
            raise ValueError(f"{where} ({node_id}): token must be a string")
        caps = {}
        for key in ("vcpus", "memory_mb"):
            value = entry.get(key)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{where} ({node_id}): {key} must be a positive integer")
            caps[key] = value
        found[node_id] = NodeEndpoint(node_id, url, token or None, **caps)
    return list(found.values())


def load_nodes(path: str | Path) -> list[NodeEndpoint]:
    with open(path, encoding="utf-8") as f:
        return parse_nodes(json.load(f))
