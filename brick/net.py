"""TCP ports: whether a local one is free to bind (and waiting until it is), whether a
remote one accepts connections."""

from __future__ import annotations

import socket

from brick.wait import wait_until


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now (``SO_REUSEADDR``: a TIME_WAIT left by a
    closed socket does not count, a listening or bound socket does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_port_free(port: int, *, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Wait until ``host:port`` can be bound (e.g. a killed server's socket has closed);
    ``brick.exception.Timeout`` after ``timeout_s``."""
    wait_until(
        lambda: port_free(port, host),
        timeout_s=timeout_s,
        what=f"port {port} on {host} to be free",
        interval_s=0.05,
        max_interval_s=0.05,
    )


def accepts(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout_s`` (the connection is
    closed at once: no payload)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
