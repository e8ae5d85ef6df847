"""brick.tgt against a real tgtd on 127.0.0.1, read through real initiators (qemu's libiscsi
driver: qemu-img, qemu-io; libiscsi's iscsi-ls). Nothing is faked; a missing tool fails."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from brick.exception import CommandFailed, Conflict, NotFound
from brick.executor import Result, execute
from brick.tgt import Chap, TgtAdm, TgtDaemon
from brick.tgt.daemon import SOCKET_DIR
from brick.wait import wait_until

IQN = "iqn.2010-10.org.openstack:volume-brick-test"
CHAP = Chap("vmt.relay", "s3cret-pass-123")
MIB = 1 << 20


def test_tools_are_installed() -> None:
    for tool in ("tgtd", "tgtadm", "qemu-img", "qemu-io", "iscsi-ls", "iscsi-inq", "nsenter"):
        assert shutil.which(tool), f"{tool} is missing: install tgt, qemu-utils, libiscsi-bin"


# -- helpers ---------------------------------------------------------------------------------
def free_control_port() -> int:
    """A control port with no socket file and no daemon answering."""
    for _ in range(100):
        port = random.randint(1000, 9999)
        if not (SOCKET_DIR / f"socket.{port}").exists() and not TgtAdm(port).answers():
            return port
    raise AssertionError("no free tgtd control port in 1000-9999")


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def url(daemon: TgtDaemon, iqn: str = IQN, chap: Chap | None = None, lun: int = 1) -> str:
    auth = f"{chap.user}%{chap.password}@" if chap else ""
    return f"iscsi://{auth}{daemon.portals[0]}/{iqn}/{lun}"


def run(*argv: str) -> Result:
    return execute(list(argv), check_exit_code=False, timeout_s=60)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_back(daemon: TgtDaemon, tmp_path: Path, **kw: object) -> Path:
    out = tmp_path / f"read-{uuid.uuid4().hex[:8]}.raw"
    result = run("qemu-img", "convert", "-O", "raw", url(daemon, **kw), str(out))  # type: ignore[arg-type]
    assert result.exit_code == 0, result.stderr
    return out


def unused_block_major() -> int:
    text = Path("/proc/devices").read_text().partition("Block devices:")[2]
    used = {int(line.split()[0]) for line in text.splitlines() if line.strip()}
    return next(major for major in range(240, 255) if major not in used)  # "local use"


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in {"Z", "X"}


@contextlib.contextmanager
def holding(target_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """An initiator that stays logged in: qemu-io reading commands from a pipe we keep open.
    Closing the pipe makes it quit; it is killed (by its PID) only if it does not."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-r", target_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        if proc.stderr is not None:
            proc.stderr.close()


def assert_gone(daemon: TgtDaemon, pid: int) -> None:
    assert not pid_alive(pid), f"tgtd pid {pid} still runs"
    for path in daemon.socket_files:
        assert not path.exists(), path
    assert not daemon.pidfile.exists()
    assert not TgtAdm(daemon.control_port).answers()


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:
    """Make and start TgtDaemons on 127.0.0.1; every one is stopped at the end, whatever
    happened (stop() through tgtadm; SIGKILL by the PID we started as a last resort)."""
    started: list[tuple[TgtDaemon, int]] = []

    def make(**kw: object) -> TgtDaemon:
        run_dir = tmp_path / f"run{len(started)}"
        portals = kw.pop("portals", None) or [f"127.0.0.1:{free_tcp_port()}"]
        daemon = TgtDaemon(free_control_port(), portals, run_dir=run_dir, **kw)  # type: ignore[arg-type]
        daemon.start()
        assert daemon.pid is not None
        started.append((daemon, daemon.pid))
        return daemon

    yield make
    leaked = []
    for daemon, pid in started:
        try:
            daemon.stop()
        finally:
            if pid_alive(pid):
                leaked.append(pid)
                if "tgtd" in Path(f"/proc/{pid}/comm").read_text():
                    os.kill(pid, signal.SIGKILL)  # the PID this fixture started
            for path in daemon.socket_files:
                path.unlink(missing_ok=True)
    assert not leaked, f"stop() left tgtd running: {leaked}"


@pytest.fixture
def daemon(daemon_factory) -> TgtDaemon:
    return daemon_factory()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.raw"
    path.write_bytes(os.urandom(4 * MIB))
    return path


# -- tests -----------------------------------------------------------------------------------
def test_export_and_read_back(daemon: TgtDaemon, image: Path, tmp_path: Path) -> None:
    adm = TgtAdm(daemon.control_port)
    tid = adm.create_target(IQN, image)

    target = adm.find(IQN)
    assert target is not None and target.tid == tid
    assert [(lun.number, lun.backing_path, lun.size_mb, lun.readonly) for lun in target.luns] == [
        (1, str(image), 4, True)
    ]
    assert target.acl == ("ALL",) and target.accounts == ()
    assert read_back(daemon, tmp_path).read_bytes() == image.read_bytes()

    listing = run("iscsi-ls", "-s", f"iscsi://{daemon.portals[0]}/")
    assert listing.exit_code == 0, listing.stderr
    assert f"Target:{IQN} Portal:{daemon.portals[0]}" in listing.stdout
    inquiry = run("iscsi-inq", url(daemon))
    assert inquiry.exit_code == 0 and "VIRTUAL-DISK" in inquiry.stdout, inquiry


def test_chap(daemon: TgtDaemon, image: Path, tmp_path: Path) -> None:
    adm = TgtAdm(daemon.control_port)
    adm.create_target(IQN, image, chap=CHAP)
    assert adm.find(IQN).accounts == ("vmt.relay",)  # type: ignore[union-attr]
    assert "vmt.relay" in adm.accounts()

    assert read_back(daemon, tmp_path, chap=CHAP).read_bytes() == image.read_bytes()
    for wrong in (Chap("vmt.relay", "wrong-password-1"), Chap("someone", "s3cret-pass-123"), None):
        out = tmp_path / "refused.raw"
        result = run("qemu-img", "convert", "-O", "raw", url(daemon, chap=wrong), str(out))
        assert result.exit_code != 0
        assert "Authentication failure" in result.stderr, result.stderr


def test_readonly_lun_refuses_writes(daemon: TgtDaemon, image: Path, tmp_path: Path) -> None:
    adm = TgtAdm(daemon.control_port)
    before = sha256(image)
    adm.create_target(IQN, image)
    result = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 512", url(daemon))
    assert result.exit_code != 0
    assert "write protected" in result.stderr, result.stderr
    assert sha256(image) == before

    # the same write goes through a read-write LUN: it is the readonly flag that refused it
    writable = tmp_path / "writable.raw"
    shutil.copyfile(image, writable)
    rw_iqn = IQN + "-rw"
    adm.create_target(rw_iqn, writable, readonly=False)
    result = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 512", url(daemon, iqn=rw_iqn))
    assert result.exit_code == 0, result.stderr
    assert writable.read_bytes()[:512] == b"\x5a" * 512


def test_create_target_is_idempotent_and_reports_conflicts(
    daemon: TgtDaemon, image: Path, tmp_path: Path
) -> None:
    adm = TgtAdm(daemon.control_port)
    tid = adm.create_target(IQN, image, chap=CHAP)
    assert adm.create_target(IQN, str(image), chap=CHAP) == tid
    assert [t.iqn for t in adm.targets()] == [IQN]

    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(MIB))
    for kw, detail in [
        ({"backing_path": other}, "exports"),
        ({"readonly": False}, "readonly"),
        ({"chap": None}, "CHAP"),
        ({"initiators": ["127.0.0.1"]}, "ACL"),
        ({"lun": 2}, "no LUN 2"),
    ]:
        args = {"backing_path": image, "chap": CHAP} | kw
        with pytest.raises(Conflict, match=detail):
            adm.create_target(IQN, args.pop("backing_path"), **args)  # type: ignore[arg-type]
    assert [(t.tid, t.iqn, len(t.luns)) for t in adm.targets()] == [(tid, IQN, 1)]

    # a second target takes the next tid; both share the CHAP account
    second = adm.create_target(IQN + "-2", other, chap=CHAP, initiators=["127.0.0.0/8"])
    assert second != tid
    assert adm.find(IQN + "-2").acl == ("127.0.0.0/8",)  # type: ignore[union-attr]
    assert read_back(daemon, tmp_path, iqn=IQN + "-2", chap=CHAP).read_bytes() == (
        other.read_bytes()
    )


def test_failed_create_leaves_no_half_target(
    daemon: TgtDaemon, image: Path, tmp_path: Path
) -> None:
    adm = TgtAdm(daemon.control_port)
    # a block device node of a driver this kernel does not have: it passes validation, and
    # tgtd fails to open it (ENXIO) once the target and its CHAP account exist
    broken = tmp_path / "broken.blk"
    os.mknod(broken, 0o600 | stat.S_IFBLK, os.makedev(unused_block_major(), 0))
    with pytest.raises(CommandFailed, match="invalid request"):
        adm.create_target(IQN, broken, chap=CHAP)
    assert adm.targets() == []
    assert adm.accounts() == []
    # and the IQN is free for a good export afterwards
    assert adm.create_target(IQN, image, chap=CHAP) >= 1


def test_connections_while_an_initiator_holds_the_target(daemon: TgtDaemon, image: Path) -> None:
    adm = TgtAdm(daemon.control_port)
    adm.create_target(IQN, image, chap=CHAP)
    assert adm.connections(IQN) == []
    assert adm.connections(IQN + "-missing") == []

    with holding(url(daemon, chap=CHAP)):
        found = wait_until(lambda: adm.connections(IQN), timeout_s=10, what="qemu-io to log in")
        assert [(c.initiator, c.address) for c in found] == [
            ("iqn.2008-11.org.linux-kvm", "127.0.0.1")
        ]
        with holding(url(daemon, chap=CHAP)):
            wait_until(lambda: len(adm.connections(IQN)) == 2, timeout_s=10, what="a second login")
        wait_until(lambda: len(adm.connections(IQN)) == 1, timeout_s=10, what="one logout")
    wait_until(lambda: adm.connections(IQN) == [], timeout_s=10, what="the last logout")


def test_delete_target_is_idempotent_and_forces_connected_initiators(
    daemon: TgtDaemon, image: Path
) -> None:
    adm = TgtAdm(daemon.control_port)
    adm.create_target(IQN, image, chap=CHAP)
    adm.create_target(IQN + "-2", image, chap=CHAP)

    with holding(url(daemon, chap=CHAP)):
        wait_until(lambda: adm.connections(IQN), timeout_s=10, what="qemu-io to log in")
        adm.delete_target(IQN)
        assert adm.find(IQN) is None
    adm.delete_target(IQN)  # already gone: fine
    assert adm.accounts() == ["vmt.relay"]  # still used by the second target

    adm.delete_target(IQN + "-2")
    assert adm.targets() == []
    assert adm.accounts() == []


def test_stop_leaves_no_process_and_no_socket(daemon: TgtDaemon, image: Path) -> None:
    adm = TgtAdm(daemon.control_port)
    adm.create_target(IQN, image)
    pid = daemon.pid
    assert pid is not None and daemon.running()
    assert daemon.pidfile.read_text().strip() == str(pid)
    assert all(path.exists() for path in daemon.socket_files)

    with holding(url(daemon)):  # a connected initiator does not keep tgtd alive
        wait_until(lambda: adm.connections(IQN), timeout_s=10, what="qemu-io to log in")
        daemon.stop()
    assert_gone(daemon, pid)
    assert not daemon.running()
    daemon.stop()  # idempotent
    assert_gone(daemon, pid)


def test_stop_kills_a_hung_daemon_by_pid(daemon: TgtDaemon) -> None:
    pid = daemon.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # our own tgtd: it no longer answers tgtadm
    daemon.stop(timeout_s=1.0)
    assert_gone(daemon, pid)


def test_adopt_a_running_daemon(daemon: TgtDaemon, image: Path, tmp_path: Path) -> None:
    TgtAdm(daemon.control_port).create_target(IQN, image)
    pid = daemon.pid
    assert pid is not None

    # a restarted owner: a new object with the same control port, portals and run_dir
    again = TgtDaemon(daemon.control_port, daemon.portals, run_dir=daemon.run_dir)
    assert again.adopt()
    assert again.pid == pid and again.running()
    again.start()  # already running: adopts, starts nothing
    assert again.pid == pid

    other_portals = TgtDaemon(daemon.control_port, ["127.0.0.1:1"], run_dir=daemon.run_dir)
    with pytest.raises(Conflict, match="runs as"):
        other_portals.adopt()

    elsewhere = TgtDaemon(daemon.control_port, daemon.portals, run_dir=tmp_path / "elsewhere")
    assert not elsewhere.adopt()
    with pytest.raises(Conflict, match="another tgtd answers"):
        elsewhere.start()

    again.stop()
    assert_gone(daemon, pid)
    assert not TgtDaemon(daemon.control_port, daemon.portals, run_dir=daemon.run_dir).adopt()


def test_stale_pidfile_is_not_adopted(tmp_path: Path) -> None:
    daemon = TgtDaemon(free_control_port(), ["127.0.0.1:1"], run_dir=tmp_path)
    daemon.pidfile.write_text(f"{os.getpid()}\n")  # a live process, but no tgtd
    assert not daemon.adopt()
    assert not daemon.pidfile.exists()


def test_start_refuses_a_portal_in_use(daemon_factory, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        portal = f"127.0.0.1:{busy.getsockname()[1]}"
        daemon = TgtDaemon(free_control_port(), [portal], run_dir=tmp_path)
        with pytest.raises(Conflict, match="could not bind"):
            daemon.start()
    assert daemon.pid is None
    assert not daemon.pidfile.exists()
    for path in daemon.socket_files:
        assert not path.exists()
    assert not TgtAdm(daemon.control_port).answers()


def test_two_daemons_with_their_own_control_ports(
    daemon_factory, image: Path, tmp_path: Path
) -> None:
    first, second = daemon_factory(), daemon_factory()
    assert first.control_port != second.control_port
    TgtAdm(first.control_port).create_target(IQN, image)
    assert TgtAdm(second.control_port).targets() == []
    assert read_back(first, tmp_path).read_bytes() == image.read_bytes()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vmt-tgt-{uuid.uuid4().hex[:8]}"
    execute(["ip", "netns", "add", name])
    try:
        execute(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        execute(["ip", "netns", "delete", name])


def test_daemon_in_a_network_namespace(
    daemon_factory, netns: str, image: Path, tmp_path: Path
) -> None:
    with pytest.raises(NotFound, match="network namespace"):
        TgtDaemon(
            free_control_port(), ["127.0.0.1:3260"], run_dir=tmp_path, netns="vmt-none"
        ).start()
    daemon = daemon_factory(netns=netns)
    assert os.stat(f"/proc/{daemon.pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    adm = TgtAdm(daemon.control_port)  # the control socket is a file: reachable from here
    adm.create_target(IQN, image)

    out = tmp_path / "netns.raw"
    inside = run(
        "ip", "netns", "exec", netns, "qemu-img", "convert", "-O", "raw", url(daemon), str(out)
    )
    assert inside.exit_code == 0, inside.stderr
    assert out.read_bytes() == image.read_bytes()
    # the portal is inside the namespace only
    outside = run("iscsi-ls", f"iscsi://{daemon.portals[0]}/")
    assert outside.exit_code != 0

    again = TgtDaemon(daemon.control_port, daemon.portals, run_dir=daemon.run_dir)
    with pytest.raises(Conflict, match="network namespace"):
        again.adopt()
    again = TgtDaemon(daemon.control_port, daemon.portals, run_dir=daemon.run_dir, netns=netns)
    assert again.adopt()
