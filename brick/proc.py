"""What /proc tells: a process's command line, whether it still runs, TCP connections.

Daemons are recognised by PID *and* command line before anything signals them, so that a
reused PID is never taken for ours.
"""

from __future__ import annotations

from pathlib import Path


def cmdline(pid: int) -> list[str]:
    """The argv of process ``pid`` ([] if it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rpartition(")")[2].split()[0] in {"Z", "X"}


def established_connections(port: int) -> int:
    """TCP connections established to local ``port`` in this network namespace."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[3] == "01":
                count += 1
    return count
