"""qemu-storage-daemon values: names, paths, hosts, portals and IQNs as QMP takes them.

Pure checks (no daemon needed): each returns the value (canonical) or raises
``InvalidArgument``. Also the limits the daemon's other modules share.
"""

from __future__ import annotations

import ipaddress
import os
import re

from brick import values
from brick.exception import InvalidArgument

_NODE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")  # QEMU: letter first, < 32 characters
_DAEMON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_CHAP_USER = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
_EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")
MAX_READAHEAD_KIB = 1 << 20
MAX_MMAP_THRESHOLD_KIB = 1 << 22


# -- validation (pure) -----------------------------------------------------------------------
def validate_node_name(value: object, field: str = "node") -> str:
    """A QEMU node name as used here: ``[A-Za-z][A-Za-z0-9_-]{0,30}`` (QEMU allows 31 chars)."""
    if not isinstance(value, str) or not _NODE.fullmatch(value):
        raise InvalidArgument(field, value, "must match [A-Za-z][A-Za-z0-9_-]{0,30}")
    return value


def validate_daemon_name(value: object) -> str:
    if not isinstance(value, str) or not _DAEMON_NAME.fullmatch(value):
        raise InvalidArgument("name", value, "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    return value


validate_netns = values.netns


def validate_abs_path(value: object, field: str) -> str:
    """An absolute path without control characters or commas (QEMU option syntax)."""
    if not isinstance(value, str | os.PathLike):
        raise InvalidArgument(field, value, "must be a path")
    text = os.fspath(value)
    if not isinstance(text, str) or not os.path.isabs(text):
        raise InvalidArgument(field, value, "must be an absolute path")
    if any(ord(c) < 32 or c == "\x7f" for c in text) or "," in text:
        raise InvalidArgument(field, value, "must not contain control characters or commas")
    return os.path.normpath(text)


def validate_host(value: object, field: str = "host") -> str:
    """An IP address literal or a DNS name; an IPv6 literal without brackets."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOSTNAME.fullmatch(value):
                return value
    raise InvalidArgument(field, value, "must be an IP address or a host name")


def validate_port(value: object, field: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidArgument(field, value, "must be an integer 1-65535")
    return value


def validate_portal(value: object, field: str = "portal") -> str:
    """``host:port`` or ``[ipv6]:port``; returned canonical."""
    try:
        head, port_text = values.Portal.split(value)
    except ValueError as err:
        rule = str(err) if "brackets" in str(err) else "must be host:port or [ipv6]:port"
        raise InvalidArgument(field, value, rule) from None
    if not values.is_ascii_decimal(port_text):
        raise InvalidArgument(field, value, "must be host:port with a numeric port")
    port = validate_port(int(str(port_text)), field)
    return values.join_host_port(validate_host(head, field), port)


def validate_iqn(value: object, field: str = "iqn") -> str:
    if not values.IQN.is_valid(value, forms=values.IQN.FORMS):
        raise InvalidArgument(field, value, "must be iqn.YYYY-MM.domain[:suffix], eui. or naa.")
    return str(value)


def _validate_int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(field, value, f"must be an integer {low}-{high}")
    return value
