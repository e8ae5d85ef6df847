"""Validation of every value that crosses Volt's API boundary, and the peer id rule.

Peer id rule (wire format of the original: ``"<host>:<volume_id>"``):

* the host part is an IPv4 address, a DNS name (neither contains ``:``), or an IPv6
  address in brackets, e.g. ``[fd00::5]:volume-img1``;
* the volume id is everything after the ``:`` that ends the host part, so a volume id may
  itself contain ``:`` without making the peer id ambiguous.

IPv6 hosts are stored in their compressed form, so ``::0:1`` and ``::1`` are one host.
"""

import ipaddress
import re

from brick import values
from volt.errors import InvalidInput

VOLUME_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
MAX_IQN = values.MAX_IQN
MAX_LUN = 16383


def volume_id(value: object, field: str = "volume_id") -> str:
    if not isinstance(value, str) or not VOLUME_ID_RE.fullmatch(value):
        raise InvalidInput(
            field,
            f"must be 1-255 characters of A-Z a-z 0-9 . _ : - starting with a letter or "
            f"digit, got {value!r}",
        )
    return value


def host(value: object, field: str = "host") -> str:
    """An IPv4/IPv6 address or a DNS name; addresses come back in canonical form."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(field, f"must be an IP address or a DNS name, got {value!r}")
    candidate = values.unbracket(value)
    try:
        if "%" in candidate:  # an IPv6 zone ("fe80::1%eth0") means nothing to other hosts
            raise ValueError(candidate)
        address = ipaddress.ip_address(candidate)
    except ValueError:
        if len(value) <= 253 and HOSTNAME_RE.fullmatch(value) and not _all_numeric(value):
            return value.lower()
        raise InvalidInput(field, f"must be an IP address or a DNS name, got {value!r}") from None
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


def _all_numeric(name: str) -> bool:
    # "1.2.3" or "300.1.1.1" look like broken IPv4 addresses, not host names.
    return all(label.isdigit() for label in name.split("."))


def _bounded_int(value: object, field: str, low: int, high: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInput(field, f"must be an integer {low}-{high}, got {value!r}")
    text = str(value)
    if not text.isascii() or not text.isdigit() or len(text) > 6 or not low <= int(text) <= high:
        raise InvalidInput(field, f"must be an integer {low}-{high}, got {value!r}")
    return str(int(text))


def port(value: object, field: str = "port") -> str:
    """A TCP port, as the decimal string the original protocol carries."""
    return _bounded_int(value, field, 1, 65535)


def port_number(value: object, field: str) -> int:
    """A TCP port as a JSON integer 1-65535 (an extension's field: no strings, no booleans)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInput(field, f"must be an integer 1-65535, got {value!r}")
    return value


def lun(value: object, field: str = "lun") -> str:
    return _bounded_int(value, field, 0, MAX_LUN)


def flag(value: object, field: str) -> bool:
    """A JSON boolean (no 0/1 or strings: a typo must not turn a flag on)."""
    if not isinstance(value, bool):
        raise InvalidInput(field, f"must be true or false, got {value!r}")
    return value


def iqn(value: object, field: str = "iqn") -> str:
    if not values.IQN.is_valid(value, forms=values.IQN.FORMS):
        raise InvalidInput(
            field, f"must be an iSCSI name (iqn.YYYY-MM.domain[:id], eui., naa.), got {value!r}"
        )
    return str(value)


def make_peer_id(host_: str, volume_id_: str) -> str:
    """Peer id of a validated host and volume id."""
    return values.join_host_port(host_, volume_id_)


def split_peer_id(value: object, field: str = "peer_id") -> tuple[str, str]:
    """Validate a peer id and return (canonical host, volume id)."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be '<host>:<volume_id>', got {value!r}")
    if value.startswith("["):
        end = value.find("]:")
        host_part, volume_part = (value[1:end], value[end + 2 :]) if end > 0 else ("", "")
        if ":" not in host_part:
            raise InvalidInput(field, f"brackets are only for IPv6 hosts, got {value!r}")
    else:
        host_part, _, volume_part = value.partition(":")
    if not host_part or not volume_part:
        raise InvalidInput(field, f"must be '<host>:<volume_id>', got {value!r}")
    try:
        return host(host_part, field), volume_id(volume_part, field)
    except InvalidInput:
        raise InvalidInput(field, f"must be '<host>:<volume_id>', got {value!r}") from None
