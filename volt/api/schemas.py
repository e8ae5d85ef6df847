"""Request bodies: which keys each operation accepts, and their validators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from volt import traffic, validation
from volt.errors import InvalidInput, MalformedBody

Validator = Callable[[object, str], str]

QUERY = {
    "host": validation.host,
    "port": validation.port,
    "iqn": validation.iqn,
    "lun": validation.lun,
    "peer_id": validation.split_peer_id,
}
REGISTER: dict[str, Callable[..., Any]] = {
    "host": validation.host,
    "port": validation.port,
    "iqn": validation.iqn,
    "lun": validation.lun,
    "nbd_port": validation.port,
    "place": validation.flag,
}
# ``host`` too, except with a node token: its own host is the default (handlers.register).
REGISTER_REQUIRED = ("port", "iqn", "lun")
DEAD_PARENT: dict[str, Callable[..., Any]] = {"parent": validation.split_peer_id}
# ``bytes_read`` and ``api_port`` are extensions (the original's nodes send neither):
# ``api_port`` is the node daemon's own port, used only to probe its liveness
# (volt/deathwatch.py).
HEARTBEAT: dict[str, Callable[..., Any]] = {
    "host": validation.host,
    "bytes_read": traffic.entries,
    "api_port": validation.port_number,
}


def extract(
    body: Any, schema: dict[str, Callable[..., Any]], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Validate a JSON object body against ``schema``; unknown keys are an error."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise MalformedBody("request body must be a JSON object")
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise InvalidInput(unknown[0], f"unknown field; allowed: {', '.join(sorted(schema))}")
    values = {key: schema[key](value, key) for key, value in body.items() if value is not None}
    for key in required:
        if key not in values:
            raise InvalidInput(key, "is required")
    return values
