"""The value types every package shares: iSCSI names, portals, hosts, ports, namespace names.

One rule each, written once. The functions here raise :class:`ValueError` (a plain reason,
without the value) so that each package can wrap it in its own error type and keep its public
messages; brick's own callers use :func:`iqn`, :func:`netns` and :func:`port`, which raise
:class:`brick.exception.InvalidArgument`.

* :class:`IQN`: RFC 3720 names ``iqn.YYYY-MM.reversed.domain[:identifier]`` (month 01-12, ASCII
  digits only, lower-case domain labels as RFC 3722's normalisation leaves them) and
  ``eui.`` + 16 hex digits; ``naa.`` + 16 or 32 hex digits (RFC 3980) where a caller allows it.
  At most 223 characters.
* :class:`Portal`: ``host:port``; an IPv6 host is written in brackets, ``[fd00::1]:3260``.
  :func:`bracket` is the one place that adds the brackets, :func:`unbracket` the one that
  removes them (once: ``[[::1]]`` is not a host).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import ClassVar

from brick.exception import InvalidArgument

MAX_IQN = 223
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_IQN_FORM = re.compile(
    rf"iqn\.[0-9]{{4}}-(?:0[1-9]|1[0-2])\.{_LABEL}(?:\.{_LABEL})*(?::[A-Za-z0-9._:-]+)?",
    re.ASCII,
)
_EUI_FORM = re.compile(r"eui\.[0-9A-Fa-f]{16}", re.ASCII)
_NAA_FORM = re.compile(r"naa\.(?:[0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})", re.ASCII)
_NETNS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*", re.ASCII)


class IQN(str):
    """A checked iSCSI name; it is a ``str``, so it goes anywhere a name goes."""

    FORMS: ClassVar[tuple[str, ...]] = ("iqn", "eui", "naa")

    @classmethod
    def parse(cls, value: object, forms: tuple[str, ...] = ("iqn", "eui")) -> IQN:
        """The name, or :class:`ValueError`. ``forms`` lists the accepted kinds
        (``"iqn"``, ``"eui"``, ``"naa"``)."""
        if not isinstance(value, str) or not value:
            raise ValueError("not an iSCSI name")
        if len(value) > MAX_IQN:
            raise ValueError(f"longer than {MAX_IQN} characters")
        patterns = {"iqn": _IQN_FORM, "eui": _EUI_FORM, "naa": _NAA_FORM}
        if not any(patterns[form].fullmatch(value) for form in forms):
            raise ValueError(f"not an iSCSI name of the forms {', '.join(forms)}")
        return cls(value)

    @classmethod
    def is_valid(cls, value: object, forms: tuple[str, ...] = ("iqn", "eui")) -> bool:
        try:
            cls.parse(value, forms)
        except ValueError:
            return False
        return True


def iqn(value: object, field: str = "iqn", forms: tuple[str, ...] = ("iqn",)) -> str:
    """brick's check: :class:`IQN` or :class:`InvalidArgument`."""
    try:
        return str(IQN.parse(value, forms))
    except ValueError:
        shown = "iqn.YYYY-MM.reverse.domain[:A-Za-z0-9._:-]"
        if "eui" in forms:
            shown += ", eui. or naa." if "naa" in forms else " or eui."
        raise InvalidArgument(field, value, f"must be {shown}, <= {MAX_IQN} chars") from None


# -- hosts and portals ------------------------------------------------------------------------
def bracket(host: str) -> str:
    """``[host]`` for an IPv6 address (anything with a ``:``), else the host unchanged."""
    return f"[{host}]" if ":" in host else host


def unbracket(host: str) -> str:
    """The host without one pair of brackets around it (``[::1]`` -> ``::1``)."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def join_host_port(host: str, port_number: int | str) -> str:
    """``host:port``, or ``[v6]:port``."""
    return f"{bracket(host)}:{port_number}"


def is_ascii_decimal(text: object) -> bool:
    """ASCII digits only (``str.isdigit`` also accepts "²" and other scripts' digits)."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


def parse_port(value: object, low: int = 1, high: int = 65535) -> int:
    """An int or ASCII decimal text in ``low..high`` (not a bool), or :class:`ValueError`."""
    if isinstance(value, bool):
        raise ValueError("not a port")
    if isinstance(value, str) and is_ascii_decimal(value) and len(value) <= 6:
        value = int(value)
    if not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"must be an integer {low}-{high}")
    return value


def port(value: object, field: str = "port", low: int = 1, high: int = 65535) -> int:
    """brick's check: an ``int`` (not text, not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(field, value, f"must be an integer {low}-{high}")
    return value


def ip(value: object) -> str:
    """An IPv4/IPv6 literal, brackets allowed once; canonical text, or :class:`ValueError`."""
    if not isinstance(value, str) or not value.isascii():
        raise ValueError("not an IP address")
    return str(ipaddress.ip_address(unbracket(value)))


def host(value: object) -> str:
    """An IP literal (canonical, without brackets) or a DNS name; or :class:`ValueError`."""
    try:
        return ip(value)
    except ValueError:
        if isinstance(value, str) and _HOSTNAME.fullmatch(value):
            return value
    raise ValueError("not an IP address or a host name")


@dataclass(frozen=True)
class Portal:
    """An iSCSI/NBD portal: a host (an IP literal or a name, never bracketed) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)

    @classmethod
    def split(cls, text: object, default_port: int | None = None) -> tuple[str, str | None]:
        """``(host, port text)`` of ``h:p``, ``[v6]:p``, or (with a default port) a bare ``h``
        or ``[v6]``; the host comes back without its brackets. :class:`ValueError` if the text
        has no such shape (an IPv6 address without brackets, an unclosed bracket)."""
        if not isinstance(text, str) or not text:
            raise ValueError("must be host:port")
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ValueError("unclosed bracket")
            head, rest = text[1:close], text[close + 1 :]
            if ":" not in head:
                raise ValueError("only IPv6 addresses go in brackets")
            if not rest and default_port is not None:
                return head, None
            if not rest.startswith(":"):
                raise ValueError("must be host:port")
            return head, rest[1:]
        if text.count(":") > 1:
            raise ValueError("an IPv6 address needs brackets: [ipv6]:port")
        if ":" not in text:
            if default_port is None:
                raise ValueError("must be host:port")
            return text, None
        head, _, port_text = text.partition(":")
        return head, port_text

    @classmethod
    def parse(cls, text: object, default_port: int | None = None, names: bool = False) -> Portal:
        """A portal from ``host:port`` text (``names`` allows DNS names, else IPs only)."""
        head, port_text = cls.split(text, default_port)
        address = host(head) if names else ip(head)
        number = default_port if port_text is None else parse_port(port_text)
        assert number is not None
        return cls(address, number)


# -- network namespaces -----------------------------------------------------------------------
def is_netns_name(value: object) -> bool:
    """An ``ip netns`` name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``."""
    return isinstance(value, str) and bool(_NETNS.fullmatch(value))


def netns(value: object) -> str:
    """A network namespace name, or :class:`InvalidArgument`."""
    if not is_netns_name(value):
        raise InvalidArgument("netns", value, "must be a network namespace name [A-Za-z0-9._-]")
    assert isinstance(value, str)
    return value
