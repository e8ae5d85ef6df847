"""Checks of every field the z/VM-shaped API accepts (the connector's semantics, our limits).

Each function returns the value as the API uses it, or raises ``InvalidInput`` naming the
field, the value and the rule. Nothing is changed on the node before these pass.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from virtman.errors import InvalidInput

USERID = re.compile(r"[A-Za-z0-9]{1,8}")
VDEV = re.compile(r"[0-9A-Fa-f]{1,4}")
MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
DISK_SIZE = re.compile(r"([0-9]{1,12})([mMgG]?)")
MAX_MEM = re.compile(r"[1-9][0-9]{0,3}[mMgG]")
WORD = re.compile(r"\w{1,64}")
OS_VERSION = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,31}")
HOSTNAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
POOL = re.compile(r"\w{1,64}:\w{1,64}")
REMOTE_HOST = re.compile(r"[A-Za-z0-9-]{1,64}@[A-Za-z0-9.-]{1,253}")
TRUE = {"true", "1", "on", "yes"}
FALSE = {"false", "0", "off", "no"}
MAX_VCPUS = 256
MAX_MEMORY_MB = 4 << 20  # 4 TiB
MAX_WAIT_S = 3600


def userid(value: object) -> str:
    """A z/VM userid: 1-8 of A-Z a-z 0-9, upper-cased."""
    if not isinstance(value, str) or not USERID.fullmatch(value):
        raise InvalidInput("userid", value, "must be 1-8 letters or digits")
    return value.upper()


def userids(value: object) -> list[str]:
    """A comma-separated list of userids (``?userid=A,B``)."""
    if not isinstance(value, str) or not value or value.count(",") >= 64:
        raise InvalidInput("userid", value, "must be 1-64 comma-separated userids")
    return [userid(v) for v in value.split(",")]


def fields(body: object, where: str, allowed: set[str], required: set[str] = set()) -> dict:  # noqa: B006
    """``body`` as a dict with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(body, dict):
        raise InvalidInput(where, body, "must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(
            where, unknown, f"unknown fields (allowed: {', '.join(sorted(allowed))})"
        )
    missing = sorted(required - set(body))
    if missing:
        raise InvalidInput(where, missing, "required fields missing")
    return body


def integer(value: object, field: str, low: int, high: int) -> int:
    """An int or a string of digits (the connector accepts both), ``low``..``high``."""
    if isinstance(value, bool):
        raise InvalidInput(field, value, f"must be an integer {low}-{high}")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    if not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(field, value, f"must be an integer {low}-{high}")
    return value


def boolean(value: object, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in TRUE | FALSE:
        return value.lower() in TRUE
    raise InvalidInput(field, value, "must be a boolean (true/false, yes/no, on/off, 1/0)")


def disk_gb(value: object, field: str = "size") -> int:
    """A disk size in whole GiB (rounded up): ``<n>g``, ``<n>m``, or a bare ``<n>`` of 512-byte
    blocks (what ``image_get_root_disk_size`` answers; Nova sends it for root_gb = 0)."""
    match = DISK_SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidInput(field, value, "must be <n>g, <n>m or <n> 512-byte blocks (e.g. 10g)")
    number, unit = int(match.group(1)), match.group(2).lower()
    per_gib = {"g": 1, "m": 1024, "": 1 << 21}[unit]
    gib = -(-number // per_gib)
    if not 1 <= gib <= 65536:
        raise InvalidInput(field, value, "must be 1 MiB to 64 TiB")
    return gib


def vdev(value: object, field: str = "vdev") -> str:
    if not isinstance(value, str) or not VDEV.fullmatch(value):
        raise InvalidInput(field, value, "must be 1-4 hexadecimal digits")
    return value.upper().zfill(4)


def mac(value: object) -> str:
    if not isinstance(value, str) or not MAC.fullmatch(value):
        raise InvalidInput("mac_addr", value, "must be six hex pairs separated by ':'")
    return value.lower()


def ipv4(value: object, field: str) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise InvalidInput(field, value, "must be an IPv4 address") from None


def cidr(value: object) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise InvalidInput("cidr", value, "must be an address/prefix") from None


def os_version(value: object) -> str:
    if not isinstance(value, str) or not OS_VERSION.fullmatch(value):
        raise InvalidInput("os_version", value, "must be a distribution and version, e.g. rhel8.4")
    return value


def text(value: object, field: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(field, value, f"must match {pattern.pattern}")
    return value


def optional(body: dict, key: str, check: Any, *args: Any) -> Any:
    """``check(body[key], *args)`` if the key is there and not null, else None."""
    value = body.get(key)
    return None if value is None else check(value, *args)
