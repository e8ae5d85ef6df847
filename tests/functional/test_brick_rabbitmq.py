"""brick.rabbitmq: a private broker on loopback, started, used, killed, restarted and
stopped by PID, leaving nothing behind. Its ports come from VMT_TEST_TGT_BASE (+70)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from brick import proc, rabbitmq
from brick.wait import wait_until

pytestmark = pytest.mark.functional
PORT = int(os.environ.get("VMT_TEST_TGT_BASE", "3400")) + 70


def _open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_private_broker_on_loopback(tmp_path: Path) -> None:
    assert rabbitmq.available(), "rabbitmq-server is not installed (tools/setup.sh installs it)"
    broker = rabbitmq.RabbitMQ(tmp_path / "rmq", port=PORT, name="vmttest")
    try:
        broker.start()
        beam, epmd = broker.broker.pid, broker.epmd.pid
        assert beam is not None and epmd is not None
        assert _open(PORT) and broker.alive()
        assert str(tmp_path) in " ".join(proc.cmdline(beam))  # its own home, not the system's
        assert broker.transport_url.startswith("rabbit://vmthunder:")

        # A second owner adopts the running broker instead of starting another.
        again = rabbitmq.RabbitMQ(
            tmp_path / "rmq", port=PORT, name="vmttest", password=broker.password
        ).start()
        assert again.broker.pid == beam

        # Killed: gone at once; started again on the same data.
        assert broker.kill() == beam
        assert proc.is_gone(beam)
        # the listening socket goes with the last process holding it (a helper of beam's)
        wait_until(lambda: not _open(PORT), timeout_s=10, what="the AMQP port to close")
        broker.start()
        assert broker.broker.pid != beam and _open(PORT)
        beam = broker.broker.pid
    finally:
        broker.stop()
    assert proc.is_gone(beam) and proc.is_gone(epmd)
    wait_until(lambda: not _open(PORT), timeout_s=10, what="the AMQP port to close")
    assert not (tmp_path / "rmq" / "rabbitmq.pid").exists()
