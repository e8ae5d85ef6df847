"""brick.net: whether a local port can be bound, and waiting until it can."""

from __future__ import annotations

import socket
import threading

import pytest

from brick import net
from brick.exception import Timeout

pytestmark = pytest.mark.unit


def test_a_listening_port_is_not_free_and_a_closed_one_is() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert not net.port_free(port)
    with pytest.raises(Timeout, match=f"port {port} on 127.0.0.1 to be free"):
        net.wait_port_free(port, timeout_s=0.1)
    closing = threading.Event()

    def close_soon() -> None:
        closing.set()  # before close: the wait may see the port free before a set after it
        listener.close()

    threading.Timer(0.05, close_soon).start()
    net.wait_port_free(port, timeout_s=5)
    assert closing.is_set() and net.port_free(port)


def test_accepts_tells_a_listening_port_from_a_closed_one() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert net.accepts("127.0.0.1", port, 1.0)
    assert not net.accepts("127.0.0.1", port, 1.0)  # closed now: refused
