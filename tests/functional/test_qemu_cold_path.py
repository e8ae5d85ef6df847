"""The qemu driver's cold read path, for real: an image server's tgtd on 127.0.0.1, the
driver's qemu-storage-daemon reading it over iSCSI into its qcow2 cache, the FUSE origin
and a VM's overlay over it. What a cold reader gets back must be the image's bytes, the
cache must hold them afterwards, and the two read-path tunables (the FUSE export's
readahead window, qemu-storage-daemon's malloc mmap threshold) must reach the kernel and
the daemon. Every daemon is stopped by PID at the end; nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from brick.executor import execute
from brick.qsd.daemon import mounted_paths
from brick.tgt import TgtDaemon
from tests.functional.clusterfixtures import TGT_BASE, disk_matches, write_image
from tests.functional.voltproc import free_port
from virtman.conf import Settings
from virtman.drivers.qemu.driver import QemuDriver
from virtman.layers.base import CacheSpec, Endpoint, SnapshotSpec, UpstreamSpec

pytestmark = pytest.mark.functional

MIB = 1 << 20
KIB = 1 << 10
IMAGE_MIB = 16
MakeDriver = Callable[..., QemuDriver]
IQN_PREFIX = "iqn.2010-10.org.openstack:"
# tgtd control ports: below virtmanproc's (base + 90...), above the clusters' (base + n)
SERVER_TGT_PORT = TGT_BASE + 80
NODE_TGT_PORT = TGT_BASE + 81


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[TgtDaemon]:
    server = TgtDaemon(SERVER_TGT_PORT, [f"127.0.0.1:{free_port()}"], run_dir=tmp_path / "tgt")
    server.start()
    try:
        yield server
    finally:
        for target in server.adm.targets():
            server.adm.delete_target(target.iqn)
        server.stop()


def settings(tmp_path: Path, **overrides: int) -> Settings:
    state = tmp_path / "node" / "state"
    base = Settings(
        host_ip="127.0.0.2",
        master_url="http://127.0.0.1:1",
        master_token=None,
        heartbeat_interval=1.0,
        state_dir=state,
        cache_dir=state / "cache",
        instances_dir=state / "instances",
        run_dir=tmp_path / "node" / "run",
        iscsi_port=free_port(),
        nbd_port=0,  # no NBD server: this test reads through the FUSE origin only
        tgt_control_port=NODE_TGT_PORT,
    )
    return replace(base, **overrides)


@pytest.fixture
def make_driver(tmp_path: Path) -> Iterator[MakeDriver]:
    made: list[QemuDriver] = []

    def make(**overrides: int) -> QemuDriver:
        driver = QemuDriver(settings(tmp_path, **overrides))
        made.append(driver)
        driver.start()
        return driver

    yield make
    errors: list[Exception] = []
    for driver in made:
        try:
            driver.qsd.stop(timeout_s=5)
            for target in driver.tgt.targets():
                driver.tgt.delete_target(target.iqn)
            driver.tgtd.stop()
        except Exception as exc:  # stop the others too
            errors.append(exc)
    assert not errors, errors


def export(server: TgtDaemon, name: str, path: Path) -> Endpoint:
    iqn = f"{IQN_PREFIX}volume-{name}"
    server.adm.create_target(iqn, path)
    return Endpoint(server.portals[0], iqn, 1)


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").partition("=") for item in raw if b"=" in item)
    return {key: value for key, _, value in pairs}


def cached_bytes(path: Path) -> int:
    out = execute(["qemu-img", "map", "-U", "--output=json", str(path)], timeout_s=30).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and e["depth"] == 0)


def read_cold(path: Path, offsets: list[int], length: int) -> bytes:
    """``length`` bytes at each offset, read through the FUSE file (page cache dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return b"".join(os.pread(fd, length, off) for off in offsets)
    finally:
        os.close(fd)


def test_cold_reads_come_back_right_and_fill_the_cache(
    make_driver: MakeDriver, image_server: TgtDaemon, tmp_path: Path
) -> None:
    seq_image, rand_image = tmp_path / "seq.raw", tmp_path / "rand.raw"
    write_image(seq_image, IMAGE_MIB)
    write_image(rand_image, IMAGE_MIB)
    driver = make_driver()
    assert driver.settings.qemu_fuse_readahead_kib == 4096
    assert driver.settings.qemu_malloc_mmap_threshold_kib == 32768

    # the malloc tunable reached the daemon's environment
    assert driver.qsd.pid is not None
    assert environ(driver.qsd.pid).get("MALLOC_MMAP_THRESHOLD_") == str(32768 * KIB)

    # sequential: the whole image, 1 MiB at a time, through the FUSE origin
    upstream = driver.upstream.ensure(
        UpstreamSpec("volume-seq", (export(image_server, "seq", seq_image),))
    )
    origin = driver.cache.ensure(CacheSpec("volume-seq", upstream))
    fuse = Path(origin.path)
    assert str(fuse) in mounted_paths()
    assert driver.qsd.readahead(fuse) == 4096
    cache_file = driver.names("volume-seq").cache_file
    assert cached_bytes(cache_file) == 0
    size = IMAGE_MIB * MIB
    got = read_cold(fuse, list(range(0, size, MIB)), MIB)
    assert hashlib.sha256(got).digest() == hashlib.sha256(seq_image.read_bytes()).digest()
    assert cached_bytes(cache_file) == size  # copy-on-read kept every byte
    # a VM's overlay over the origin reads the same bytes (now warm)
    overlay = driver.snapshot.ensure(SnapshotSpec("vm-seq", origin)).path
    assert disk_matches(overlay, seq_image)

    # random 64 KiB reads at distinct offsets, cold, of the second image
    upstream = driver.upstream.ensure(
        UpstreamSpec("volume-rand", (export(image_server, "rand", rand_image),))
    )
    origin = driver.cache.ensure(CacheSpec("volume-rand", upstream))
    block = 64 * KIB
    offsets = random.Random(7).sample(range(0, size, block), 64)
    data = rand_image.read_bytes()
    got = read_cold(Path(origin.path), offsets, block)
    assert got == b"".join(data[off : off + block] for off in offsets)
    assert cached_bytes(driver.names("volume-rand").cache_file) >= 64 * block


def test_zero_leaves_the_kernel_and_glibc_defaults(
    make_driver: MakeDriver, image_server: TgtDaemon, tmp_path: Path
) -> None:
    image = tmp_path / "img.raw"
    write_image(image, 4)
    driver = make_driver(qemu_fuse_readahead_kib=0, qemu_malloc_mmap_threshold_kib=0)
    assert driver.qsd.pid is not None
    assert "MALLOC_MMAP_THRESHOLD_" not in environ(driver.qsd.pid)
    upstream = driver.upstream.ensure(
        UpstreamSpec("volume-img", (export(image_server, "img", image),))
    )
    origin = driver.cache.ensure(CacheSpec("volume-img", upstream))
    default = driver.qsd.readahead(origin.path)
    assert default != 4096  # the kernel's own (small) window: what the option widens
    assert read_cold(Path(origin.path), [0], 4 * MIB) == image.read_bytes()
