"""Checks run on the client before anything is sent (the same rules virtman applies).

Every function returns the canonical value or raises :class:`ValueError` with a message of the
form ``invalid <what> '<value>': <rule>``.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from brick import values

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "use 1-64 of A-Z a-z 0-9 _ . - (not starting with _ . -)"
IMAGE_PREFIX = "volume-"
DEFAULT_IQN_PREFIX = "iqn.2010-10.org.openstack:"
ISCSI_PORT = 3260


def _decimal(text: str | None) -> TypeGuard[str]:
    """ASCII digits only (``str.isdigit`` also accepts other scripts' digits and "²")."""
    return values.is_ascii_decimal(text)


def _invalid(what: str, value: object, rule: str) -> ValueError:
    return ValueError(f"invalid {what} {value!r}: {rule}")


def name(value: object, what: str = "name") -> str:
    """An instance or image name: ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise _invalid(what, value, NAME_RULE)
    return value


def normalise_image_name(image_name: str) -> str:
    """The original's normalisation: every image is called ``volume-<name>``."""
    return image_name if image_name.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + image_name


def image_name(value: object, what: str = "image name") -> str:
    """A valid image name whose normalised form (``volume-<name>``) is valid too; returns the
    normalised form."""
    raw = name(value, what)
    normalised = normalise_image_name(raw)
    if not NAME.fullmatch(normalised):
        raise _invalid(what, value, f"too long once normalised to {normalised!r} (max 64)")
    return normalised


def image_name_as_given(value: object, what: str = "image name") -> str:
    """Check like :func:`image_name` but return the name as given (not normalised)."""
    image_name(value, what)
    return str(value)


def absolute_path(value: object, what: str = "file") -> str:
    """An absolute path (of a file on a server)."""
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        raise _invalid(what, value, "must be an absolute path on the server")
    return value


def ip(value: object, what: str = "IP address") -> str:
    """An IPv4 or IPv6 address (no host names); returns its canonical text."""
    if not isinstance(value, str):
        raise _invalid(what, value, "not an IP address")
    try:
        return values.ip(value)
    except ValueError:
        raise _invalid(what, value, "not an IP address") from None


def port(value: object, what: str = "port") -> int:
    """A TCP port 1-65535 (int or decimal text)."""
    text = str(value).strip() if isinstance(value, int | str) else None
    if isinstance(value, bool) or not _decimal(text) or not 1 <= int(text) <= 65535:
        raise _invalid(what, value, "must be a port number 1-65535")
    return int(text)


def join_host_port(host: str, port_number: int) -> str:
    """``host:port``, or ``[v6]:port`` for an IPv6 address."""
    return values.join_host_port(host, port_number)


def portal(value: object, default_port: int = ISCSI_PORT, what: str = "portal") -> str:
    """``ip:port`` / ``[v6]:port`` / a bare IPv4 or ``[v6]`` (then ``default_port``); canonical
    ``ip:port``. A bare IPv6 address is refused: ``fd00::1:3260`` could be either."""
    try:
        host, port_text = values.Portal.split(value, default_port)
    except ValueError as err:
        rule = str(err) if "brackets" in str(err) else "must be ip:port"  # the brackets' rules
        raise _invalid(what, value, rule) from None
    try:
        address = ip(host, what)
    except ValueError:
        raise _invalid(what, value, "must be ip:port with an IP address") from None
    number = default_port
    if port_text is not None:
        try:
            number = port(port_text, what)
        except ValueError:
            raise _invalid(what, value, "port must be 1-65535") from None
    return join_host_port(address, number)


def iqn(value: object, what: str = "IQN") -> str:
    """An iSCSI qualified name ``iqn.YYYY-MM.domain[:suffix]``."""
    if not values.IQN.is_valid(value, forms=("iqn",)):
        raise _invalid(what, value, "must be an iSCSI qualified name iqn.YYYY-MM.domain:...")
    return str(value)


def lun(value: object, what: str = "LUN") -> int:
    """A LUN 0-255."""
    text = str(value).strip() if isinstance(value, int | str) else ""
    if isinstance(value, bool) or not _decimal(text) or not 0 <= int(text) <= 255:
        raise _invalid(what, value, "must be an integer 0-255")
    return int(text)
