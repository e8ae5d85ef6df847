"""What /proc tells: a process's command line, whether it still runs, TCP connections.

Daemons are recognised by PID *and* command line before anything signals them, so that a
reused PID is never taken for ours.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path


def cmdline(pid: int) -> list[str]:
    """The argv of process ``pid`` ([] if it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def stat(pid: int) -> tuple[str, list[str]] | None:
    """``(command name, the fields after it)`` of ``/proc/<pid>/stat`` (state first, then
    ppid, ...: proc(5) field 3 on), or None if the process is gone."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the name is in parentheses and may itself hold spaces and ')'
    return line[line.find("(") + 1 : line.rfind(")")], line[line.rfind(")") + 2 :].split()


def describe(pid: int) -> str:
    """``<pid> <command> <state>[ <wchan>]`` of a process, for a log line about it: what a
    process that does not exit is, and where in the kernel it waits (``?`` if gone)."""
    found = stat(pid)
    if found is None:
        return f"{pid} ?"
    comm, fields = found
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        wchan = ""
    return " ".join([str(pid), comm, fields[0], *([wchan] if wchan not in ("", "0") else [])])


def is_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone)."""
    found = stat(pid)
    return found is None or found[1][0] in {"Z", "X"}


def ended(pid: int, is_ours: Callable[[int], bool]) -> bool:
    """Whether a process of ours has ended: gone or a zombie, or its PID now runs someone
    else's program. One that is still exiting (its memory, and so its command line, already
    released) has not ended yet."""
    if is_gone(pid):
        return True
    if is_ours(pid):
        return False
    # not ours: another program on a reused PID, or ours exiting (its argv already gone,
    # possibly while is_ours looked); an argv read now tells them apart
    return bool(cmdline(pid)) or is_gone(pid)


def established_connections(port: int) -> int:
    """TCP connections established to local ``port`` in this network namespace."""
    return len(established_peers(port))


def established_peers(
    port: int, tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")
) -> list[str]:
    """The remote addresses of the TCP connections established to local ``port`` in this
    network namespace, one per connection, in the tables' order (an IPv4-mapped IPv6 peer
    as IPv4)."""
    peers = []
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[3] == "01":
                peers.append(_proc_address(fields[2].rpartition(":")[0]))
    return peers


def _proc_address(text: str) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host (little-endian)
    byte order, as hex."""
    raw = b"".join(bytes.fromhex(text[i : i + 8])[::-1] for i in range(0, len(text), 8))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
