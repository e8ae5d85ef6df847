"""The dm driver's NBD relay (``dm_nbd_relay``) against a real qemu-storage-daemon on
127.0.0.1, exporting a real block device (a loop device stands in for ``cached_<image>``).

The whole dm stack runs in the guest tests; this checks the NBD side alone: the bytes a
qemu child would read, adoption by a restarted virtman, undo of a failed export, cleanup.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from brick.exception import CommandFailed, InvalidArgument, NotFound
from brick.executor import execute
from brick.proc import is_gone
from brick.qsd import QMPError
from brick.wait import wait_until
from tests.functional.test_brick_qsd import free_port
from tests.unit.fakes.settings import settings as unit_settings
from virtman.conf import Settings
from virtman.drivers.dm.nbd import NbdRelay
from virtman.errors import InvalidInput

MIB = 1 << 20
IMAGE = "volume-img1"


@pytest.fixture
def device(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A read-only loop device over 4 MiB of random bytes; detached afterwards."""
    data = os.urandom(4 * MIB)
    backing = tmp_path / "image.raw"
    backing.write_bytes(data)
    loop = execute(["losetup", "--find", "--show", "--read-only", str(backing)]).stdout.strip()
    yield loop, data
    execute(["losetup", "--detach", loop])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base = unit_settings(tmp_path / "state", host_ip="127.0.0.1")
    return replace(base, run_dir=tmp_path / "run", nbd_port=free_port(), dm_nbd_relay=True)


@pytest.fixture
def relays(settings: Settings) -> Iterator[list[NbdRelay]]:
    """NbdRelay objects of one node; the daemon is stopped by PID at the end."""
    made: list[NbdRelay] = []
    yield made
    for relay in made:
        relay.qsd.stop()


def new_relay(settings: Settings, relays: list[NbdRelay]) -> NbdRelay:
    relay = NbdRelay(settings)
    relays.append(relay)
    return relay


@pytest.fixture
def relay(settings: Settings, relays: list[NbdRelay]) -> NbdRelay:
    """A started relay (daemon and NBD server), nothing exported yet."""
    started = new_relay(settings, relays)
    started.start()
    return started


@dataclass
class Exported:
    relay: NbdRelay
    address: str  # the NBD server's host:port
    path: str  # the exported block device
    data: bytes  # its bytes


@pytest.fixture
def exported(relay: NbdRelay, device: tuple[str, bytes]) -> Exported:
    """``device`` exported as ``IMAGE`` by a started relay."""
    path, data = device
    return Exported(relay, relay.export(IMAGE, path), path, data)


def read_nbd(address: str, name: str, out: Path) -> bytes:
    execute(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd://{address}/{name}", str(out)])
    return out.read_bytes()


def test_a_child_reads_the_device_over_nbd_and_a_restart_adopts_the_export(
    settings: Settings, relays: list[NbdRelay], exported: Exported, tmp_path: Path
) -> None:
    relay, address, path, data = exported.relay, exported.address, exported.path, exported.data
    assert address == f"127.0.0.1:{settings.nbd_port}"
    assert relay.export(IMAGE, path) == address  # idempotent
    assert relay.exported(IMAGE) and not relay.exported("volume-other")
    assert read_nbd(address, IMAGE, tmp_path / "a.raw") == data
    with socket.create_connection(("127.0.0.1", settings.nbd_port)):
        assert relay.clients() >= 1

    pid = relay.qsd.pid
    relay.qsd.detach()  # virtman killed: the daemon and its export stay
    again = new_relay(settings, relays)
    again.start()
    assert again.qsd.pid == pid
    assert again.exported(IMAGE)
    assert read_nbd(address, IMAGE, tmp_path / "b.raw") == data

    again.unexport(IMAGE)
    again.unexport(IMAGE)  # idempotent
    assert not again.exported(IMAGE)
    assert [n for n in again.qsd.nodes() if n.startswith("vmtdm")] == []
    with pytest.raises(CommandFailed, match=IMAGE):
        read_nbd(address, IMAGE, tmp_path / "c.raw")
    again.stop()  # nothing exported: the daemon goes, with its files
    assert pid is not None and is_gone(pid)
    assert sorted(p.name for p in settings.run_dir.iterdir()) == []


def test_stop_leaves_a_daemon_that_still_exports_to_its_children(
    exported: Exported, tmp_path: Path
) -> None:
    exported.relay.stop()
    assert exported.relay.qsd.running()
    assert read_nbd(exported.address, IMAGE, tmp_path / "a.raw") == exported.data


def test_sweep_removes_exports_of_images_that_are_gone(
    relay: NbdRelay, device: tuple[str, bytes]
) -> None:
    path, _ = device
    relay.export(IMAGE, path)
    relay.export("volume-img2", path)
    relay.sweep({"volume-img2"})
    assert not relay.exported(IMAGE) and relay.exported("volume-img2")
    assert len([n for n in relay.qsd.nodes() if n.startswith("vmtdm")]) == 1


def test_a_failed_export_leaves_no_node(
    settings: Settings, relays: list[NbdRelay], device: tuple[str, bytes]
) -> None:
    path, _ = device
    relay = new_relay(settings, relays)
    relay.qsd.start()  # no NBD server yet: the export step fails after the node was added
    with pytest.raises(NotFound, match="NBD server"):
        relay.export(IMAGE, path)
    assert relay.qsd.nodes() == []
    with pytest.raises(QMPError, match="No such file"):
        relay.export(IMAGE, "/dev/mapper/cached_missing")
    assert relay.qsd.nodes() == []


@pytest.mark.parametrize(
    ("image", "device", "field"),
    [
        ("volume img", "/dev/loop0", "image"),
        ("volume-img1", "dev/loop0", "path"),
        ("volume-img1", "/dev/loop0\n", "path"),
    ],
)
def test_bad_names_and_paths_are_refused_before_anything_is_made(
    relay: NbdRelay, image: str, device: str, field: str
) -> None:
    with pytest.raises((InvalidArgument, InvalidInput), match=field):
        relay.export(image, device)
    assert relay.qsd.nodes() == [] and relay.qsd.exports() == []


def test_nbd_relay_needs_a_port(settings: Settings) -> None:
    with pytest.raises(ValueError, match="nbd_port"):
        NbdRelay(Settings(**{**settings.__dict__, "nbd_port": 0}))


def test_a_killed_daemon_is_started_again_with_its_exports(
    exported: Exported, tmp_path: Path
) -> None:
    relay, address, path, data = exported.relay, exported.address, exported.path, exported.data
    assert relay.heal(lambda: {IMAGE: path}) is False  # alive: nothing to do
    pid = relay.qsd.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # our own daemon, by the PID we started it with
    wait_until(lambda: is_gone(pid), timeout_s=10, what="the killed daemon to go")
    relay.unexport(IMAGE)  # a dead daemon holds nothing: no error
    assert relay.heal(lambda: {IMAGE: path}) is True
    assert relay.qsd.pid not in (None, pid)
    assert relay.exported(IMAGE)
    assert read_nbd(address, IMAGE, tmp_path / "a.raw") == data


def test_a_daemon_left_with_the_option_off_is_drained_then_stopped(
    settings: Settings, relays: list[NbdRelay], exported: Exported, tmp_path: Path
) -> None:
    pid = exported.relay.qsd.pid
    exported.relay.qsd.detach()  # virtman killed, then restarted with dm_nbd_relay off
    off = replace(settings, dm_nbd_relay=False, nbd_port=0)
    left = NbdRelay.leftover(off)
    assert left is not None
    relays.append(left)
    assert left.draining and left.qsd.pid == pid and left.address == exported.address
    assert left.heal(lambda: {IMAGE: exported.path}) is False
    assert read_nbd(exported.address, IMAGE, tmp_path / "a.raw") == exported.data
    left.unexport(IMAGE)  # its last export: the daemon stops
    assert pid is not None and is_gone(pid)
    assert NbdRelay.leftover(off) is None  # nothing left now
