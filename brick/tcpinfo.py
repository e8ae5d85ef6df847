"""Bytes a process received per TCP peer, from the kernel's ``tcp_info`` (``ss -tinp``).

For a daemon that keeps no per-connection counters of its own (qemu-storage-daemon's NBD and
iSCSI paths): ``bytes_received`` of each established socket counts the payload the peer
sent on it, protocol headers included, since the connection was made.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from brick.executor import Result, execute

_PID = re.compile(r"pid=(\d+),")
_RECEIVED = re.compile(r"\bbytes_received:(\d+)")

Peer = tuple[str, int]  # (canonical address, port)
Run = Callable[..., Result]  # brick.executor.execute, or a test's fake


def canonical(host: str) -> str | None:
    """An IP address in the form ``ss`` prints it after unbracketing (IPv4-mapped IPv6
    as IPv4); None for a name, which a socket's peer never is."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


def _peer(text: str) -> Peer | None:
    host, _, port = text.rpartition(":")
    address = canonical(host.partition("%")[0])  # "fe80::1%eth0": the zone is not needed
    if address is None or not port.isdigit():
        return None
    return address, int(port)


def parse(out: str, pid: int) -> dict[Peer, list[int]]:
    """``bytes_received`` of ``pid``'s sockets in ``ss -tinpH state established`` output,
    per peer (one entry per socket)."""
    found: dict[Peer, list[int]] = {}
    peer: Peer | None = None
    for line in out.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():  # a socket: Recv-Q Send-Q local peer users:((...))
            fields = line.split()
            mine = any(int(p) == pid for p in _PID.findall(line))
            peer = _peer(fields[3]) if mine and len(fields) >= 4 else None
            if peer is not None:
                found.setdefault(peer, []).append(0)
        elif peer is not None:  # its tcp_info (bytes_received is absent while 0)
            match = _RECEIVED.search(line)
            if match:
                found[peer][-1] = int(match.group(1))
            peer = None
    return found


def received(pid: int, *, run: Run = execute) -> dict[Peer, list[int]]:
    """Per peer, ``bytes_received`` of each established TCP socket of process ``pid``."""
    out = run(["ss", "-tinpH", "state", "established"], timeout_s=10.0).stdout
    return parse(out, pid)
