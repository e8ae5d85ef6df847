"""``zvm_api_auth = peer-uid``: callers on this host identified by the owner of their socket.

Nova's ``zvm`` driver (Nova 34, ``nova/virt/zvm/utils.py``) builds
``zvmconnector.connector.ZVMConnector(host, port, ssl_enabled=..., verify=ca_file)``: no
``token_path``, no ``auth="token"``, no client certificate. It cannot authenticate with a token
or TLS. It runs on the compute host itself, so the API listens on loopback only and lets in a
connection without a token only if the *local* process that opened it runs as one of
``zvm_api_peer_users`` (e.g. ``nova``). The kernel tells who: the client's end of a loopback
TCP connection is a row of ``/proc/self/net/tcp`` (``tcp6``) with its owner's uid. A remote
caller cannot reach a loopback listener; a local caller as another user is refused; a token
(``X-Auth-Token``) is still accepted from anyone.
"""

from __future__ import annotations

import ipaddress
import logging
import pwd
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

LOG = logging.getLogger(__name__)
NET = Path("/proc/self/net")
ESTABLISHED = "01"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def resolve_uids(users: Iterable[str]) -> frozenset[int]:
    """Numeric uids of user names or numbers; ``ValueError`` names an unknown user."""
    uids = set()
    for user in users:
        user = user.strip()
        if user.isdigit():
            uids.add(int(user))
            continue
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ValueError(f"zvm_api_peer_users: no user {user!r} on this host") from None
    return frozenset(uids)


def _address(text: str) -> tuple[str, int]:
    """``/proc/net/tcp``'s ``HEX_ADDRESS:HEX_PORT`` (address words in host byte order)."""
    hexaddr, _, hexport = text.partition(":")
    raw = b"".join(
        struct.pack("=I", int(hexaddr[i : i + 8], 16)) for i in range(0, len(hexaddr), 8)
    )
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    address = ipaddress.ip_address(socket.inet_ntop(family, raw))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(hexport, 16)


def _plain(host: str) -> str:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def socket_owner(client: tuple[str, int], server: tuple[str, int], net: Path = NET) -> int | None:
    """The uid owning the client end (``client`` -> ``server``) of an established TCP
    connection of this network namespace; None if no such socket is found."""
    want_local = (_plain(client[0]), client[1])
    want_remote = (_plain(server[0]), server[1])
    for name in ("tcp", "tcp6"):
        try:
            lines = (net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != ESTABLISHED:
                continue
            try:
                if _address(fields[1]) == want_local and _address(fields[2]) == want_remote:
                    return int(fields[7])
            except (ValueError, OSError):
                continue
    return None


class PeerUids:
    """Lets in loopback connections whose client socket is owned by one of ``uids``."""

    def __init__(self, uids: frozenset[int], net: Path = NET) -> None:
        self.uids = uids
        self.net = net

    def allows(self, client: tuple[str, int] | None, server: tuple[str, int] | None) -> bool:
        if client is None or server is None or not is_loopback(client[0].split("%", 1)[0]):
            return False
        uid = socket_owner(client, server, self.net)
        if uid in self.uids:
            return True
        LOG.warning(
            "z/VM API: caller %s:%d runs as uid %s, not one of zvm_api_peer_users, and sent "
            "no valid token",
            client[0],
            client[1],
            "unknown" if uid is None else uid,
        )
        return False
