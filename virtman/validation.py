"""Validation of everything that reaches virtman from outside (names end up in file names,
QMP node names, IQNs and command arguments: nothing unvalidated gets that far)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from brick import values
from virtman.errors import InvalidInput
from virtman.layers.base import Endpoint

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*")


def name(value: object, field: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value) or value in {".", ".."}:
        raise InvalidInput(field, value, "use 1-64 of A-Z a-z 0-9 _ . - (not starting with . _ -)")
    return value


def image_name(value: object) -> str:
    """The original's normalisation: every image is ``volume-<name>``."""
    raw = name(value, "image_name")
    normalised = raw if raw.startswith("volume-") else "volume-" + raw
    return name(normalised, "image_name")


def host(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(field, value, "must be an IP address or a host name")
    bracketed = values.unbracket(value) != value
    try:
        address = ipaddress.ip_address(values.unbracket(value))
    except ValueError:
        if HOSTNAME.fullmatch(value):
            return value.lower()
        raise InvalidInput(field, value, "must be an IP address or a host name") from None
    if bracketed and address.version != 6:
        raise InvalidInput(field, value, "only IPv6 addresses go in brackets")
    return str(address)


def portal(value: object, field: str = "target_portal") -> str:
    """``host:port`` or ``[v6]:port``; returns the canonical form."""
    try:
        head, port_text = values.Portal.split(value)
    except ValueError as err:
        rule = str(err) if "brackets" in str(err) else "must be host:port"
        raise InvalidInput(field, value, rule) from None
    address = host(head, field)
    try:
        number = values.parse_port(port_text)
    except ValueError:
        raise InvalidInput(field, value, "port must be 1-65535") from None
    return values.join_host_port(address, number)


def iqn(value: object, field: str = "target_iqn") -> str:
    if not values.IQN.is_valid(value, forms=("iqn",)):
        raise InvalidInput(field, value, "must be an iSCSI qualified name iqn.YYYY-MM.domain:…")
    assert isinstance(value, str)
    return value


def lun(value: object, field: str = "target_lun") -> int:
    """An int, or a string of ASCII digits (XML-RPC callers send either); not a bool."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 3:
        number = int(value)
    else:
        raise InvalidInput(field, value, "must be an integer 0-255")
    if not 0 <= number <= 255:
        raise InvalidInput(field, value, "must be an integer 0-255")
    return number


def connections(value: Any) -> list[Endpoint]:
    """The original's connection dict, or a list of them (several image servers)."""
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list | tuple) or not items:
        raise InvalidInput("image_connection", value, "a connection dict or a non-empty list")
    endpoints = []
    for item in items:
        if not isinstance(item, dict):
            raise InvalidInput("image_connection", item, "must be a dict")
        unknown = set(item) - {"target_portal", "target_iqn", "target_lun"}
        if unknown:
            raise InvalidInput("image_connection", sorted(unknown), "unknown keys")
        endpoints.append(
            Endpoint(
                portal=portal(item.get("target_portal")),
                iqn=iqn(item.get("target_iqn")),
                lun=lun(item.get("target_lun", 1)),
            )
        )
    if len({e.iqn for e in endpoints}) != 1:
        raise InvalidInput("image_connection", value, "every path must export the same IQN")
    return endpoints
