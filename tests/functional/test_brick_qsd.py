"""brick.qsd against real qemu-storage-daemon processes on 127.0.0.1 (NBD upstreams, FUSE
exports, tgtd for iSCSI). Nothing is faked; a missing tool fails the test.

Every daemon is stopped by PID in a finalizer (``StorageDaemon.stop`` checks the PID's
command line first), and every FUSE mount is gone before tmp_path is cleaned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from brick.exception import Conflict, InvalidArgument, NotFound, Timeout
from brick.executor import execute
from brick.qsd import QMPClient, QMPDisconnected, QMPError, StorageDaemon
from brick.qsd.daemon import mounted_paths
from brick.qsd.mounts import fuse_mounts_under, unmount_dead_fuse_exports

MIB = 1 << 20
IMAGE_SIZE = 32 * MIB
REPO = Path(__file__).resolve().parents[2]

MakeDaemon = Callable[..., StorageDaemon]


def test_tools_are_installed() -> None:
    for tool in ("qemu-storage-daemon", "qemu-img", "fusermount3", "nsenter", "ip"):
        assert shutil.which(tool), f"{tool} is missing: install qemu-system-common, fuse3"


# -- helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_uncached(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    """Read through the FUSE export itself: drop the file's page cache first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.fstat(fd).st_size if length is None else offset + length
        chunks, pos = [], offset
        while pos < size:
            chunk = os.pread(fd, min(4 * MIB, size - pos), pos)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def qemu_img_info(path: Path) -> dict:
    return json.loads(
        execute(["qemu-img", "info", "-U", "--output=json", str(path)], timeout_s=30).stdout
    )


def cached_bytes(path: Path) -> int:
    """Bytes of guest data the qcow2 holds itself (``qemu-img map``, no backing in file)."""
    out = execute(["qemu-img", "map", "-U", "--output=json", str(path)], timeout_s=30).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and e["depth"] == 0)


def assert_gone(daemon: StorageDaemon, pid: int, mountpoints: list[Path]) -> None:
    assert not Path(f"/proc/{pid}").exists() or daemon.pid is None
    assert not Path(f"/proc/{pid}/cmdline").exists() or "qemu-storage-daemon" not in Path(
        f"/proc/{pid}/cmdline"
    ).read_text(errors="replace")
    mounted = mounted_paths()
    for mp in mountpoints:
        assert str(mp) not in mounted
    for path in (daemon.qmp_path, daemon.pidfile, daemon.statefile):
        assert not path.exists(), path


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def daemons(run_dir: Path) -> Iterator[MakeDaemon]:
    """``daemons(name, start=True, **kw)``: a StorageDaemon in ``run_dir``; all of them are
    stopped (by PID) at the end, even those started by another process under that name."""
    made: list[StorageDaemon] = []

    def make(name: str, *, start: bool = True, **kwargs: object) -> StorageDaemon:
        daemon = StorageDaemon(name, run_dir, **kwargs)  # type: ignore[arg-type]
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    errors = []
    for daemon in reversed(made):
        try:
            daemon.stop(timeout_s=5)
        except Exception as exc:  # keep stopping the others
            errors.append(exc)
    assert not errors, errors


@dataclass(frozen=True)
class Image:
    path: Path
    data: bytes = field(repr=False)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.path, self.data))


@pytest.fixture
def image(tmp_path: Path) -> Image:
    """A raw 32 MiB image of random bytes (``path, data = image``)."""
    data = random.randbytes(IMAGE_SIZE)
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    return Image(path, data)


def serve_image(daemons: MakeDaemon, name: str, image: Path) -> tuple[StorageDaemon, int]:
    """A daemon exporting ``image`` as NBD export ``image1`` on 127.0.0.1, and its port."""
    upstream = daemons(name)
    upstream.add_file("img", image)
    port = free_port()
    upstream.start_nbd_server("127.0.0.1", port)
    upstream.export_nbd("img-nbd", "img", "image1")
    return upstream, port


def build_chain(daemon: StorageDaemon, port: int, cache: Path, fuse: Path) -> None:
    daemon.add_nbd("path0", "127.0.0.1", port, "image1")
    daemon.add_quorum("mp0", ["path0"])
    daemon.add_qcow2_cache("cache0", cache, "mp0", IMAGE_SIZE)
    daemon.add_copy_on_read("cor0", "cache0")
    daemon.export_fuse("fuse0", "cor0", fuse)


# -- (a) the chain ---------------------------------------------------------------------------
def test_chain_nbd_quorum_cache_cor_fuse(daemons: MakeDaemon, image: Image, tmp_path: Path) -> None:
    path, data = image
    up, port = serve_image(daemons, "up", path)
    node = daemons("node")
    cache, fuse = tmp_path / "cache.qcow2", tmp_path / "image.fuse"
    build_chain(node, port, cache, fuse)

    assert node.nodes() == ["cache0", "cor0", "mp0", "path0"]
    assert node.children("mp0") == {"children.0": "path0"}
    assert node.children("cor0") == {"file": "cache0"}
    assert node.children("cache0")["backing"] == "mp0"
    assert [(e.id, e.type, e.node) for e in node.exports()] == [("fuse0", "fuse", "cor0")]
    assert str(fuse) in mounted_paths()
    assert fuse.stat().st_size == IMAGE_SIZE
    assert cached_bytes(cache) == 0
    before = qemu_img_info(cache)["actual-size"]
    assert qemu_img_info(cache).get("backing-filename") is None

    assert sha256(read_uncached(fuse)) == sha256(data)
    assert cached_bytes(cache) == IMAGE_SIZE
    assert qemu_img_info(cache)["actual-size"] >= before + IMAGE_SIZE

    # the same requests again are no-ops; other parameters under our names are conflicts
    build_chain(node, port, cache, fuse)
    with pytest.raises(Conflict):
        node.add_quorum("mp0", ["cache0"])
    with pytest.raises(Conflict):
        node.add_nbd("path0", "127.0.0.1", port, "other")
    with pytest.raises(Conflict):
        node.export_fuse("fuse0", "cache0", fuse)

    # upstream gone: the cache serves what it holds
    node_pid = node.pid
    up.stop()
    assert not up.running()
    assert sha256(read_uncached(fuse)) == sha256(data)
    assert node.pid == node_pid


def test_warm_cache_file_survives_a_restart(
    daemons: MakeDaemon, image: Image, tmp_path: Path
) -> None:
    path, data = image
    up, port = serve_image(daemons, "up", path)
    cache, fuse = tmp_path / "cache.qcow2", tmp_path / "image.fuse"
    first = daemons("node")
    build_chain(first, port, cache, fuse)
    head = read_uncached(fuse, 0, 8 * MIB)
    assert head == data[: 8 * MIB]
    first.stop()
    assert not fuse.exists()  # the mountpoint file we created is gone with the export
    warm = cached_bytes(cache)
    assert 8 * MIB <= warm <= 9 * MIB  # what was read, plus the kernel's readahead

    second = daemons("node2")
    with pytest.raises(Conflict):  # a cache of another size is never reused silently
        second.add_file("img", path)
        second.add_qcow2_cache("c-bad", cache, "img", IMAGE_SIZE * 2)
    build_chain(second, port, cache, fuse)
    assert cached_bytes(cache) == warm  # reused, not recreated
    up.stop()
    assert read_uncached(fuse, 0, 8 * MIB) == head


# -- (b) failover ----------------------------------------------------------------------------
def test_quorum_fails_over_when_an_nbd_upstream_is_killed(
    daemons: MakeDaemon, image: Image, tmp_path: Path
) -> None:
    path, data = image
    up1, port1 = serve_image(daemons, "up1", path)
    _, port2 = serve_image(daemons, "up2", path)
    up1_pid = up1.pid
    assert up1_pid is not None
    node = daemons("node")
    node.add_nbd("p0", "127.0.0.1", port1, "image1", reconnect_delay=2)
    node.add_nbd("p1", "127.0.0.1", port2, "image1", reconnect_delay=2)
    node.add_quorum("mp0", ["p0", "p1"])
    fuse = tmp_path / "mp.fuse"
    node.export_fuse("fuse0", "mp0", fuse)  # no cache: every read goes to a path

    rng = random.Random(7)
    failures: list[str] = []
    slowest = 0.0
    killed_at = None
    started = time.monotonic()
    reads = 0
    while reads < 40 or time.monotonic() - (killed_at or started) < 4:
        offset = rng.randrange(0, IMAGE_SIZE - MIB, 4096)
        t0 = time.monotonic()
        try:
            got = read_uncached(fuse, offset, MIB)
        except OSError as exc:
            failures.append(f"read {offset}: {exc}")
            continue
        finally:
            reads += 1
        took = time.monotonic() - t0
        if got != data[offset : offset + MIB]:
            failures.append(f"read {offset}: wrong bytes")
        if killed_at is not None:
            slowest = max(slowest, took)
        if reads == 10:
            os.kill(up1_pid, signal.SIGKILL)  # by PID, the first path's upstream
            killed_at = time.monotonic()
        assert time.monotonic() - started < 60
    assert killed_at is not None
    assert not failures, failures
    # the first read after the kill waits reconnect_delay on the dead path, then fails over
    assert 1.5 <= slowest < 10, f"the slowest read after the failure took {slowest:.1f} s"
    print(f"slowest read after the kill: {slowest:.2f} s")

    # the control plane drops the dead path, then adds a new one: N in children.N grows
    node.quorum_remove_child("mp0", "p0")
    node.quorum_remove_child("mp0", "p0")  # already gone: no-op
    assert node.children("mp0") == {"children.1": "p1"}
    node.delete_node("p0")
    node.delete_node("p0")
    node.add_nbd("p2", "127.0.0.1", port2, "image1", reconnect_delay=2)
    node.quorum_add_child("mp0", "p2")
    node.quorum_add_child("mp0", "p2")
    assert node.children("mp0") == {"children.1": "p1", "children.2": "p2"}
    node.quorum_remove_child("mp0", 1)
    assert node.children("mp0") == {"children.2": "p2"}
    with pytest.raises(QMPError, match="lower than the vote threshold"):
        node.quorum_remove_child("mp0", "children.2")
    assert read_uncached(fuse, 5 * MIB, MIB) == data[5 * MIB : 6 * MIB]


# -- (c) adopt -------------------------------------------------------------------------------
def test_adopt_a_daemon_started_by_another_process(
    daemons: MakeDaemon, image: Image, tmp_path: Path, run_dir: Path
) -> None:
    path, data = image
    keep = daemons("keep", start=False)  # the finalizer stops it, whoever started it
    assert keep.adopt() is False
    code = f"""
from brick.qsd import StorageDaemon
d = StorageDaemon("keep", {str(run_dir)!r})
d.start()
d.add_file("img", {str(path)!r})
d.add_qcow2_cache("cache0", {str(tmp_path / "cache.qcow2")!r}, "img")
d.add_copy_on_read("cor0", "cache0")
d.export_fuse("fuse0", "cor0", {str(tmp_path / "keep.fuse")!r})
print(d.pid)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = execute([sys.executable, "-c", code], env=env, timeout_s=60).stdout
    pid = int(out.split()[-1])

    adopted = StorageDaemon("keep", run_dir)
    assert adopted.adopt() is True
    assert adopted.pid == pid and adopted.running()
    assert adopted.nodes() == ["cache0", "cor0", "img"]
    assert [e.id for e in adopted.exports()] == ["fuse0"]
    adopted.export_fuse("fuse0", "cor0", tmp_path / "keep.fuse")  # known from the state file
    assert read_uncached(tmp_path / "keep.fuse", 0, MIB) == data[:MIB]

    # in-process: detach, then a new object adopts; start() on a running daemon adopts too
    adopted.detach()
    again = StorageDaemon("keep", run_dir)
    again.start()
    assert again.pid == pid
    assert again.nodes() == ["cache0", "cor0", "img"]
    again.stop()
    assert_gone(again, pid, [tmp_path / "keep.fuse"])
    assert keep.adopt() is False


def test_adopt_cleans_up_after_a_dead_daemon(daemons: MakeDaemon, tmp_path: Path) -> None:
    dead = daemons("dead")
    fuse = tmp_path / "dead.fuse"
    src = tmp_path / "small.raw"
    src.write_bytes(b"\x5a" * MIB)
    dead.add_file("f", src)
    dead.export_fuse("fuse0", "f", fuse)
    pid = dead.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # a SIGKILLed daemon leaves its FUSE mount behind
    assert str(fuse) in mounted_paths()
    fresh = StorageDaemon("dead", dead.run_dir)
    assert fresh.adopt() is False
    assert_gone(fresh, pid, [fuse])
    assert not fuse.exists()


def test_a_folders_dead_exports_are_unmounted_without_their_state(
    daemons: MakeDaemon, tmp_path: Path
) -> None:
    """A lab's sweep ends daemons whose state files nobody reads again: the folder's FUSE
    mounts are found and unmounted from /proc/mounts alone; other folders' mounts stay."""
    src = tmp_path / "small.raw"
    src.write_bytes(b"\x3c" * MIB)
    (tmp_path / "node").mkdir()
    inside, outside = tmp_path / "node" / "a.fuse", tmp_path / "b.fuse"
    dead, alive = daemons("dead2"), daemons("alive2")
    for daemon, mountpoint in ((dead, inside), (alive, outside)):
        daemon.add_file("f", src)
        daemon.export_fuse("fuse0", "f", mountpoint)
    pid = dead.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert fuse_mounts_under(tmp_path / "node") == [str(inside)]
    assert fuse_mounts_under(tmp_path) == [str(inside), str(outside)]
    assert unmount_dead_fuse_exports(tmp_path / "node") == [str(inside)]
    mounted = mounted_paths()
    assert str(inside) not in mounted and str(outside) in mounted
    assert read_uncached(outside, 0, MIB) == b"\x3c" * MIB
    assert unmount_dead_fuse_exports(tmp_path / "node") == []


# -- (d) stop --------------------------------------------------------------------------------
def test_stop_leaves_nothing_behind(daemons: MakeDaemon, tmp_path: Path) -> None:
    src = tmp_path / "small.raw"
    src.write_bytes(b"\xa5" * MIB)
    daemon = daemons("d")
    daemon.add_file("f", src)
    daemon.export_fuse("fuse0", "f", tmp_path / "d.fuse", mode=0o444)
    assert (tmp_path / "d.fuse").stat().st_mode & 0o777 == 0o444
    port = free_port()
    daemon.start_nbd_server("127.0.0.1", port)
    daemon.start_nbd_server("127.0.0.1", port)
    with pytest.raises(Conflict):
        daemon.start_nbd_server("127.0.0.1", free_port())
    daemon.export_nbd("n0", "f", "small")
    pid = daemon.pid
    assert pid is not None
    daemon.stop()
    assert_gone(daemon, pid, [tmp_path / "d.fuse"])
    daemon.stop()  # idempotent
    assert not daemon.running()


def test_stop_kills_a_daemon_that_ignores_sigterm(daemons: MakeDaemon, tmp_path: Path) -> None:
    """A stopped (SIGSTOP) daemon stands in for one stuck on a dead iSCSI path: SIGTERM does
    nothing, SIGKILL ends it and leaves its FUSE mount, which stop() then unmounts."""
    src = tmp_path / "small.raw"
    src.write_bytes(b"\x11" * MIB)
    daemon = daemons("stuck")
    daemon.add_file("f", src)
    fuse = tmp_path / "stuck.fuse"
    daemon.export_fuse("fuse0", "f", fuse)
    pid = daemon.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    daemon.stop(timeout_s=1)
    assert 1 <= time.monotonic() - t0 < 10
    assert_gone(daemon, pid, [fuse])
    assert not fuse.exists()


# -- (e) QMP errors, validation --------------------------------------------------------------
def test_qmp_framing_errors_and_events(daemons: MakeDaemon, tmp_path: Path) -> None:
    daemon = daemons("q")
    qmp = daemon.qmp
    assert qmp.version.startswith("7.")
    assert qmp.execute("query-version")["qemu"]["major"] >= 7
    with pytest.raises(QMPError) as err:
        qmp.execute("bogus-command")
    assert err.value.error_class == "CommandNotFound"
    assert err.value.command == "bogus-command"
    with pytest.raises(QMPError) as err:
        qmp.execute("blockdev-add", driver="file", **{"node-name": "x"}, filename="/nonexistent")
    assert err.value.error_class == "GenericError"
    assert "No such file" in err.value.desc
    with pytest.raises(Timeout):
        qmp.wait_event("NO_SUCH_EVENT", timeout_s=0.2)

    # events are buffered even when they come before the reply; ``after`` skips old ones
    src = tmp_path / "e.raw"
    src.write_bytes(b"\0" * MIB)
    daemon.add_file("f", src)
    port = free_port()
    daemon.start_nbd_server("127.0.0.1", port)
    for _ in range(2):
        daemon.export_nbd("e0", "f", "e")
        mark = qmp.event_mark()
        qmp.execute("block-export-del", id="e0")
        event = qmp.wait_event(
            "BLOCK_EXPORT_DELETED", lambda e: e["data"]["id"] == "e0", timeout_s=5, after=mark
        )
        assert event["data"] == {"id": "e0"}
        daemon.delete_export("e0")  # gone already: no-op
    daemon.export_nbd("e0", "f", "e")
    daemon.delete_export("e0")
    assert daemon.exports() == []
    assert qmp.events("BLOCK_EXPORT_DELETED") == []  # delete_export took its event

    # several threads share one client
    results: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(25):
                results.append(len(qmp.execute("query-named-block-nodes", flat=True)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == [1] * 200

    # the chardev serves one client: a second one gets no greeting
    with pytest.raises(Timeout, match="greeting"):
        QMPClient(daemon.qmp_path).connect(timeout_s=0.5)

    # the daemon dies: callers get QMPDisconnected, not a hang
    pid = daemon.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(QMPDisconnected):
        for _ in range(100):  # the reader notices the EOF at once; allow for the race
            qmp.execute("query-version")
    daemon.stop()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda d: d.add_file("1bad", "/tmp/x"), "node"),
        (lambda d: d.add_file("a" * 32, "/tmp/x"), "node"),
        (lambda d: d.add_file("ok", "relative/x"), "path"),
        (lambda d: d.add_file("ok", "/tmp/a,b"), "path"),
        (lambda d: d.add_nbd("ok", "127.0.0.1", 0, "e"), "port"),
        (lambda d: d.add_nbd("ok", "127.0.0.1; rm", 10809, "e"), "host"),
        (lambda d: d.add_nbd("ok", "127.0.0.1", 10809, "e/../x"), "export"),
        (lambda d: d.add_iscsi("ok", "127.0.0.1", "iqn.2010-10.org.x:y", 1), "portal"),
        (lambda d: d.add_iscsi("ok", "::1:3260", "iqn.2010-10.org.x:y", 1), "portal"),
        (lambda d: d.add_iscsi("ok", "127.0.0.1:3260", "not-an-iqn", 1), "iqn"),
        (lambda d: d.add_iscsi("ok", "h:3260", "iqn.2010-10.org.x:y", 1, user="u"), "user"),
        (lambda d: d.add_quorum("ok", []), "children"),
        (lambda d: d.add_quorum("ok", ["a", "a"]), "children"),
        (lambda d: d.add_quorum("ok", "ab"), "children"),
        (lambda d: d.quorum_remove_child("ok", "children.x"), "child"),
        (lambda d: d.add_qcow2_cache("ok", "/tmp/c", "b", 1000), "size"),
        (lambda d: d.add_copy_on_read("ok", "b c"), "file_node"),
        (lambda d: d.export_fuse("ok", "n", "/tmp/f", mode=0o644), "mode"),
        (lambda d: d.export_fuse("bad id", "n", "/tmp/f"), "export_id"),
        (lambda d: d.export_nbd("ok", "n", ""), "name"),
        (lambda d: d.delete_node("#block123"), "node"),
    ],
)
def test_bad_arguments_raise_before_anything_runs(
    run_dir: Path, call: Callable[[StorageDaemon], None], field: str
) -> None:
    daemon = StorageDaemon("never-started", run_dir)  # a valid call would raise NotFound
    with pytest.raises(InvalidArgument) as err:
        call(daemon)
    assert err.value.field == field
    assert not daemon.qmp_path.exists()


def test_bad_daemon_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        StorageDaemon("a/b", tmp_path)
    with pytest.raises(InvalidArgument):
        StorageDaemon("ok", "relative")
    with pytest.raises(InvalidArgument):
        StorageDaemon("ok", tmp_path, netns="../x")
    with pytest.raises(InvalidArgument, match="107"):
        StorageDaemon("ok", tmp_path / ("d" * 120))
    with pytest.raises(NotFound):
        StorageDaemon("ok", tmp_path).qmp  # noqa: B018
    with pytest.raises(NotFound):
        StorageDaemon("ok", tmp_path, netns=f"vmt-missing-{uuid.uuid4().hex[:8]}").start()


# -- network namespace -----------------------------------------------------------------------
@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vmtq-{uuid.uuid4().hex[:8]}"
    execute(["ip", "netns", "add", name])
    try:
        execute(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        execute(["ip", "netns", "delete", name])


def test_daemon_in_a_netns_exports_fuse_to_the_root_mount_namespace(
    daemons: MakeDaemon, netns: str, tmp_path: Path, image: Image
) -> None:
    path, data = image
    daemon = daemons("ns", netns=netns)
    pid = daemon.pid
    assert pid is not None
    theirs, ns = os.stat(f"/proc/{pid}/ns/net"), os.stat(f"/var/run/netns/{netns}")
    assert (theirs.st_dev, theirs.st_ino) == (ns.st_dev, ns.st_ino)
    assert os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    daemon.add_file("img", path)
    port = free_port()
    daemon.start_nbd_server("127.0.0.1", port)  # the namespace's own loopback
    daemon.export_nbd("n0", "img", "image1")
    daemon.export_fuse("fuse0", "img", tmp_path / "ns.fuse")
    assert read_uncached(tmp_path / "ns.fuse", 0, MIB) == data[:MIB]
    with socket.socket() as sock:  # nothing listens on that port in our namespace
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    # adopting with the wrong namespace is refused
    daemon.detach()
    with pytest.raises(Conflict):
        StorageDaemon("ns", daemon.run_dir).adopt()
    daemon.start()  # adopts again
    assert daemon.nodes() == ["img"]


# -- iSCSI with CHAP through tgtd ------------------------------------------------------------
def test_add_iscsi_with_chap_keeps_the_password_off_command_lines(
    daemons: MakeDaemon, image: Image, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from brick.tgt import Chap, TgtAdm, TgtDaemon

    path, data = image
    iqn = "iqn.2010-10.org.openstack:volume-qsd-test"
    chap = Chap("vmt.qsd", f"pw-{uuid.uuid4().hex[:16]}")
    portal = f"127.0.0.1:{free_port()}"
    control = next(
        p
        for p in random.sample(range(1000, 9999), 200)
        if not Path(f"/var/run/tgtd/socket.{p}").exists() and not TgtAdm(p).answers()
    )
    tgtd = TgtDaemon(control, [portal], run_dir=tmp_path / "tgt")
    try:
        tgtd.start()
        TgtAdm(control).create_target(iqn, path, chap=chap)
        caplog.set_level(logging.DEBUG)
        node = daemons("isc")
        with pytest.raises(QMPError):  # wrong password: refused, and the secret is dropped
            node.add_iscsi("lun0", portal, iqn, 1, user=chap.user, password="wrong-password-1")
        assert node.nodes() == []
        node.add_iscsi(
            "lun0",
            portal,
            iqn,
            1,
            user=chap.user,
            password=chap.password,
            initiator_name="iqn.2010-10.org.vmthunder:qsd-test",
        )
        node.add_iscsi("lun0", portal, iqn, 1, user=chap.user, password=chap.password)
        node.export_fuse("fuse0", "lun0", tmp_path / "lun.fuse")
        assert read_uncached(tmp_path / "lun.fuse", 0, MIB) == data[:MIB]
        pid = node.pid
        assert chap.password not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        assert chap.password not in caplog.text
        assert "lun0-secret" in {o["name"] for o in node.qmp.execute("qom-list", path="/objects")}
        node.delete_export("fuse0")
        node.delete_node("lun0")
        assert "lun0-secret" not in {
            o["name"] for o in node.qmp.execute("qom-list", path="/objects")
        }
        node.stop()
    finally:
        tgtd.stop()


# -- read-path tunables ----------------------------------------------------------------------
def daemon_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").partition("=") for item in raw if b"=" in item)
    return {key: value for key, _, value in pairs}


def test_fuse_readahead_and_malloc_threshold_reach_the_daemon(
    daemons: MakeDaemon, image: Image, tmp_path: Path
) -> None:
    path, data = image
    _, port = serve_image(daemons, "up", path)
    plain = daemons("plain")
    assert "MALLOC_MMAP_THRESHOLD_" not in daemon_environ(plain.pid or 0)
    node = daemons("node", malloc_mmap_threshold_kib=32768)
    assert node.pid is not None
    assert daemon_environ(node.pid)["MALLOC_MMAP_THRESHOLD_"] == str(32768 << 10)

    cache, fuse = tmp_path / "cache.qcow2", tmp_path / "image.fuse"
    node.add_nbd("path0", "127.0.0.1", port, "image1")
    node.add_quorum("mp0", ["path0"])
    node.add_qcow2_cache("cache0", cache, "mp0", IMAGE_SIZE)
    node.add_copy_on_read("cor0", "cache0")
    node.export_fuse("fuse0", "cor0", fuse, readahead_kib=4096)
    # the window is the mount's backing device's read_ahead_kb
    bdi = node.readahead_path(fuse)
    assert bdi.parent.parent == Path("/sys/class/bdi")
    assert bdi.read_text().strip() == "4096"
    assert node.readahead(fuse) == 4096
    assert sha256(read_uncached(fuse)) == sha256(data)

    # the same export again with another window: no new export, the window changes
    node.export_fuse("fuse0", "cor0", fuse, readahead_kib=512)
    assert node.readahead(fuse) == 512
    assert [e.id for e in node.exports()] == ["fuse0"]

    # an export without the option keeps the kernel's (smaller) default
    other = tmp_path / "other.fuse"
    node.export_fuse("fuse1", "mp0", other)
    assert node.readahead(other) not in (512, 4096)
    assert node.readahead_path(other) != bdi

    with pytest.raises(InvalidArgument):
        node.export_fuse("fuse2", "mp0", tmp_path / "x.fuse", readahead_kib=-1)
    with pytest.raises(InvalidArgument):
        node.set_readahead(fuse, 1 << 30)
    with pytest.raises(NotFound):
        node.set_readahead(tmp_path / "not-mounted", 128)
    with pytest.raises(InvalidArgument):
        StorageDaemon("bad", tmp_path, malloc_mmap_threshold_kib=0)
