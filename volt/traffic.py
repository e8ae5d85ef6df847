"""Bytes each node read from each of its sources, as the nodes last reported them.

A heartbeat may carry ``bytes_read``: ``[{"peer_id", "source", "bytes"}]``, the node's
read counters per upstream (``source`` is a parent's peer id, or null for the image
server). Volt keeps only each host's latest report, in memory: the counters are the nodes'
own (cumulative while a path stays connected), Volt neither sums nor persists them, so a
restarted volt-api shows nothing until the next heartbeats.
"""

from __future__ import annotations

import threading
from typing import Any

from volt import validation
from volt.errors import InvalidInput

MAX_ENTRIES = 1024  # per heartbeat (a 64 KiB body holds about 600 anyway)
MAX_BYTES = (1 << 63) - 1

Source = str | None  # a parent's peer id; None: the image server


def _entry(value: object, field: str) -> tuple[str, Source, int]:
    if not isinstance(value, dict) or set(value) != {"peer_id", "source", "bytes"}:
        raise InvalidInput(field, "must be an object with exactly peer_id, source and bytes")
    peer_id = validation.make_peer_id(*validation.split_peer_id(value["peer_id"], field))
    source = value["source"]
    if source is not None:
        source = validation.make_peer_id(*validation.split_peer_id(source, field))
    count = value["bytes"]
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_BYTES:
        raise InvalidInput(field, f"bytes must be an integer in 0..{MAX_BYTES}, got {count!r}")
    return peer_id, source, count


def entries(value: object, field: str = "bytes_read") -> list[tuple[str, Source, int]]:
    """Validate a heartbeat's ``bytes_read``: a list of at most ``MAX_ENTRIES`` entries."""
    if not isinstance(value, list):
        raise InvalidInput(field, "must be a list of {peer_id, source, bytes}")
    if len(value) > MAX_ENTRIES:
        raise InvalidInput(field, f"has {len(value)} entries, at most {MAX_ENTRIES}")
    return [_entry(item, f"{field}[{i}]") for i, item in enumerate(value)]


class ReadCounters:
    """The latest ``bytes_read`` of every host, by peer id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_host: dict[str, dict[str, dict[Source, int]]] = {}

    def report(self, host: str, reported: list[tuple[str, Source, int]]) -> None:
        """Replace ``host``'s counters; every peer id must be one of ``host``'s nodes."""
        mine: dict[str, dict[Source, int]] = {}
        for peer_id, source, count in reported:
            if validation.split_peer_id(peer_id)[0] != host:
                raise InvalidInput("bytes_read", f"{peer_id} is not a node of host {host}")
            mine.setdefault(peer_id, {})[source] = count
        with self._lock:
            self._by_host[host] = mine

    def of(self, peer_id: str) -> dict[Source, int] | None:
        """``{source: bytes}`` last reported for ``peer_id``; None if never reported."""
        try:
            host = validation.split_peer_id(peer_id)[0]
        except InvalidInput:
            return None
        with self._lock:
            found = self._by_host.get(host, {}).get(peer_id)
            return dict(found) if found is not None else None

    def forget(self, host: str) -> None:
        with self._lock:
            self._by_host.pop(host, None)


def as_json(counts: dict[Source, int] | None) -> list[dict[str, Any]] | None:
    """``[{"source", "bytes"}]`` (image server first), or None if nothing was reported."""
    if counts is None:
        return None
    order = sorted(counts, key=lambda s: (s is not None, s or ""))
    return [{"source": s, "bytes": counts[s]} for s in order]
