"""The dm driver on real kernels: QEMU guests (guestkit) as an image server and 3 nodes.

S runs tgtd (the image, CHAP) and volt-api; A, B and C run OUR virtmanserver with
driver = dm and create one VM disk each through their own XML-RPC API. Volt's balanced
placement (fan-out 2) puts A and B under the image server and C under A, with B as C's
standby parent: C is the grandchild and reads through A's LIO relay. All four guests boot
once for the module; each test checks one part of what they report. Every packet stays on
the run's bridge inside the namespace guestkit creates: nothing here connects to a guest.
A missing QEMU fails these tests, it never skips them.
"""

from __future__ import annotations

import configparser
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from guestkit import Node, RunResult, build_guest, run_guests

SIZE_MIB = 48
SIZE = SIZE_MIB << 20
CHECKOUT = Path(__file__).resolve().parents[2]
WORK_DIR = CHECKOUT / ".work" / "dm-guests"  # the last run's consoles and logs
NODES = [Node("S", 640, 1), Node("A", 768, 2), Node("B", 768, 3), Node("C", 768, 4)]

RUN_SH = """#!/bin/sh
mkdir -p /etc/rtslib-fb-target
[ "$CI_role" = S ] || iscsid || exit 1
exec python3 -u /ci/dmguest.py
"""

# The guests' side, run as /ci/dmguest.py (the project's code is on the payload disk).
GUEST = r'''
"""Runs inside each guest of tests/functional/test_dm_guests.py; the role is $CI_role.

S: the image server (tgtd, CHAP) and volt-api, plus a coordination board on tcp/9999 (SET/GET
of keys, GET waits). A, B, C: compute nodes running virtmanserver with driver = dm, each
creating one VM disk through its own XML-RPC API. Balanced placement (fan-out 2) puts A and
B under the image server and C under A, with B as C's standby parent. Every node writes
/ci/out/result.json; every address used is a guest address on the run's bridge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import xmlrpc.client
from pathlib import Path

ROLE = os.environ.get("CI_role", "?")
OUT = Path("/ci/out")
MIB = 1 << 20
SIZE_MIB = int(os.environ.get("CI_size", "48"))
IPS = {"S": "10.77.0.1", "A": "10.77.0.2", "B": "10.77.0.3", "C": "10.77.0.4"}
BOARD = (IPS["S"], 9999)
IMAGE = "volume-img"
IQN = f"iqn.2010-10.org.openstack:{IMAGE}"
CHAP_USER, CHAP_PASSWORD = "vmt-chap", "s3cret-Chap-pw-42"
TOKEN = "volt-token-for-the-guests"
RPC = "http://127.0.0.1:7774/RPC2"
T0 = time.monotonic()
result: dict = {"role": ROLE, "steps": []}


def log(msg: str) -> None:
    print(f"[{ROLE} {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def step(name: str):
    t = time.monotonic()
    log(f"STEP {name}")
    ok = False
    try:
        yield
        ok = True
    finally:
        result["steps"].append({"step": name, "ok": ok, "s": round(time.monotonic() - t, 1)})
        log(f"{'OK' if ok else 'FAIL'} {name} ({time.monotonic() - t:.1f}s)")


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


# -- the board (S serves it; everyone waits on it) ---------------------------------------------
class Board(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("0.0.0.0", BOARD[1]), BoardHandler)  # noqa: S104
        self.values: dict[str, str] = {}
        self.cond = threading.Condition()


class BoardHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        verb, _, rest = self.rfile.readline().decode().strip().partition(" ")
        board: Board = self.server  # type: ignore[assignment]
        key, _, value = rest.partition(" ")
        with board.cond:
            if verb == "SET":
                board.values[key] = value
                board.cond.notify_all()
                self.wfile.write(b"OK\n")
                return
            board.cond.wait_for(lambda: key in board.values, timeout=900)
            self.wfile.write((board.values.get(key, "") + "\n").encode())


def board(line: str, timeout: float = 900.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(BOARD, timeout=timeout) as s:
                s.sendall(line.encode() + b"\n")
                return s.makefile().readline().strip()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def board_set(key: str, value: object = "1") -> None:
    board(f"SET {key} {json.dumps(value)}")
    log(f"board: {key} set")


def board_get(key: str) -> object:
    log(f"board: waiting for {key}")
    return json.loads(board(f"GET {key}"))


# -- block I/O ---------------------------------------------------------------------------------
def sha256(path: str, size: int = MIB) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    offset = 0
    try:
        while (n := os.preadv(fd, [buf], offset)) > 0:
            h.update(buf[:n])
            offset += n
    finally:
        os.close(fd)
    return h.hexdigest()


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    try:
        return buf[: os.preadv(fd, [buf], offset)]
    finally:
        os.close(fd)


def sectors_read(device: str) -> int:
    name = os.path.basename(os.path.realpath(device))
    return int(Path(f"/sys/block/{name}/stat").read_text().split()[2])


class Reader(threading.Thread):
    """Reads the whole device once in 1 MiB O_DIRECT reads, ``pause_s`` after each."""

    def __init__(self, path: str, pause_s: float) -> None:
        super().__init__(daemon=True)
        self.path, self.pause_s = path, pause_s
        self.done = 0
        self.errors: list[str] = []
        self.max_stall = 0.0
        self.sha = ""

    def run(self) -> None:
        h = hashlib.sha256()
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MIB)
        try:
            while True:
                t = time.monotonic()
                try:
                    n = os.preadv(fd, [buf], self.done * MIB)
                except OSError as exc:
                    self.errors.append(f"{exc.strerror} at {self.done} MiB")
                    time.sleep(0.5)
                    if len(self.errors) > 20:
                        return
                    continue
                self.max_stall = max(self.max_stall, time.monotonic() - t)
                if n <= 0:
                    break
                h.update(buf[:n])
                self.done += 1
                time.sleep(self.pause_s)
        finally:
            os.close(fd)
        self.sha = h.hexdigest()


# -- S: image server, volt-api, board, measurement -----------------------------------------------
def image_server() -> None:
    from brick.tgt import Chap, TgtDaemon

    server = Board()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with step("image file and tgtd target (CHAP, read-only)"):
        Path("/run/img").mkdir()
        data = os.urandom(SIZE_MIB * MIB)
        Path("/run/img/base.img").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        tgtd = TgtDaemon(0, [f"{IPS['S']}:3260"], run_dir=Path("/run/tgt"))
        tgtd.start()
        chap = Chap(CHAP_USER, CHAP_PASSWORD)
        tgtd.adm.create_target(IQN, "/run/img/base.img", lun=1, readonly=True, chap=chap)
    with step("volt-api (balanced, fan-out 2, 2 parents per node)"):
        Path("/run/volt").mkdir()
        Path("/run/volt/volt.conf").write_text(
            f"[DEFAULT]\nbind_host = {IPS['S']}\nbind_port = 7447\nnode_timeout = 60\n"
            "default_executor = balanced\n[auth]\n"
            f"token = {TOKEN}\n[database]\nconnection = sqlite:////run/volt/volt.sqlite\n"
        )
        volt = subprocess.Popen(
            ["volt-api", "--config-file", "/run/volt/volt.conf"],
            stdout=open(OUT / "volt-api.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        request = urllib.request.Request(
            f"http://{IPS['S']}:7447/v1/volumes", headers={"X-Auth-Token": TOKEN}
        )
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
                    if answer.status == 200:
                        break
            except OSError:
                if volt.poll() is not None or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)
    board_set("image", {"sha": sha, "size": len(data)})
    board_get("C-built")  # the failover is over: the measurement may take CPU now
    measure = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "virtman.drivers.dm.measure",
            "--size-mib",
            "16",
            "--passes",
            "3",
            "--engine",
            "256 KiB blocks (default)",
            "--engine",
            "bcache",
            "--engine",
            "writecache",
            "--json",
            str(OUT / "measure.json"),
        ],
    )
    board_get("A-done")
    with step("volt-api and tgtd stop"):
        volt.send_signal(signal.SIGTERM)
        volt.wait(timeout=60)
        tgtd.adm.delete_target(IQN)
        tgtd.stop()
    with step("cache engines: bytes fetched upstream, first and later reads"):
        assert measure.wait(timeout=400) == 0


# -- A, B, C: compute nodes ------------------------------------------------------------------------
class Virtman:
    """virtmanserver with driver = dm, started (and killed) by PID."""

    def __init__(self) -> None:
        self.conf = Path("/run/virtman.conf")
        self.conf.write_text(
            "[DEFAULT]\n"
            f"host_ip = {IPS[ROLE]}\nmaster_ip = {IPS['S']}\nmaster_token = {TOKEN}\n"
            "heartbeat_interval = 2\ndriver = dm\nstate_dir = /run/vmt-state\n"
            "run_dir = /run/virtman\nlisten_host = 127.0.0.1\nlisten_port = 7774\n"
            f"chap_user = {CHAP_USER}\nchap_password = {CHAP_PASSWORD}\n"
            "dm_cache_size_mib = 65536\nparent_wait_timeout = 120\n"
            f"log_dir = {OUT}\nlog_file = virtman.log\ndebug = true\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.rpc = xmlrpc.client.ServerProxy(RPC, allow_none=True)

    def start(self) -> float:
        t = time.monotonic()
        self.proc = subprocess.Popen(
            ["virtmanserver", "--config-file", str(self.conf)],
            stdout=open(OUT / "virtmanserver.out", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 240
        while True:
            try:
                self.rpc.list()
                return round(time.monotonic() - t, 1)
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    rc = self.proc.poll()
                    raise RuntimeError(f"virtmanserver did not start (rc {rc})") from None
                time.sleep(0.3)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=300)


def kernel_state() -> dict:
    """What the kernel has now: dm tables, iSCSI sessions, LIO targets, loops, bcache sets."""
    from brick.lio import LioTargets

    lio = LioTargets()
    sessions = sh("iscsiadm", "-m", "session", check=False)
    return {
        "dm": sorted(sh("dmsetup", "table").strip().splitlines()),
        "sessions": sorted(line for line in sessions.splitlines() if line.startswith("tcp")),
        "lio": [e.iqn for e in lio.list()],
        "lio_storage": sorted(so.name for so in lio.rtslib.RTSRoot().storage_objects),
        "loops": sorted(sh("losetup", "--list", "--noheadings").splitlines()),
        "bcache_sets": sorted(p.name for p in Path("/sys/fs/bcache").iterdir() if p.is_dir()),
    }


def multipath_paths() -> list[str]:
    """The portals of multipath_<image>'s paths, in table order (first = reads)."""
    from brick.devmapper import DeviceMapper, parse_multipath_table

    table = DeviceMapper().table(f"multipath_{IMAGE}")[0]
    portals = []
    for devno in parse_multipath_table(table.args).paths:
        real = os.path.realpath(f"/sys/dev/block/{devno}")
        session = next(p for p in real.split("/") if p.startswith("session"))
        conn = Path(f"/sys/class/iscsi_session/{session}/device")
        address = next(conn.glob("connection*/iscsi_connection/*/persistent_address"))
        port = address.with_name("persistent_port")
        portals.append(f"{address.read_text().strip()}:{port.read_text().strip()}")
    return portals


def compute() -> None:
    from brick.devmapper import DeviceMapper
    from brick.lio import LioTargets

    vm = f"vm-{ROLE.lower()}"
    virtman = Virtman()
    with step("virtmanserver starts (dm driver: modules, bcache cache set)"):
        result["start_s"] = virtman.start()
    image = board_get("image")
    assert isinstance(image, dict)
    if ROLE == "B":
        board_get("A-built")
    if ROLE == "C":
        board_get("B-built")
    connection = {"target_portal": f"{IPS['S']}:3260", "target_iqn": IQN, "target_lun": 1}
    with step(f"create {vm} through XML-RPC"):
        t = time.monotonic()
        answer = virtman.rpc.create(vm, IMAGE, connection)
        result["create"] = answer
        result["create_s"] = round(time.monotonic() - t, 1)
        assert answer == f"0:/dev/mapper/snapshot_{vm}", answer
    disk = f"/dev/mapper/snapshot_{vm}"
    mp = f"/dev/mapper/multipath_{IMAGE}"
    result["paths"] = multipath_paths()
    result["list"] = virtman.rpc.list()
    if ROLE == "C":
        with step("reads while the first parent path (A) goes down: no read error"):
            reader = Reader(disk, pause_s=0.1)
            reader.start()
            while reader.done < 6 and reader.is_alive():
                time.sleep(0.05)
            sh("ip", "route", "add", "blackhole", f"{IPS['A']}/32")
            down_at = reader.done
            dm = DeviceMapper()
            failed = []
            while reader.is_alive():
                status = dm.multipath_status(f"multipath_{IMAGE}")
                failed = failed or [p.device for p in status.failed_paths]
                time.sleep(0.2)
            reader.join()
            result["failover"] = {
                "errors": reader.errors,
                "read_mib": reader.done,
                "down_at_mib": down_at,
                "max_stall_s": round(reader.max_stall, 1),
                "failed_paths_seen": failed,
                "sha_ok": reader.sha == image["sha"],
            }
            sh("ip", "route", "del", "blackhole", f"{IPS['A']}/32")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:  # the driver's monitor reinstates, fails back
                read_at(mp, 0, 4096)  # dm-multipath picks the group at the next I/O
                status = dm.multipath_status(f"multipath_{IMAGE}")
                if not status.failed_paths and status.groups[0].state == "A":
                    break
                time.sleep(1)
            result["failover"]["back_s"] = round(time.monotonic() - (deadline - 90), 1)
            result["failover"]["status_after"] = repr(status)
            assert reader.errors == [] and reader.sha == image["sha"], result["failover"]
    with step("full reads of the VM disk: the image's bytes; bytes fetched upstream"):
        fetched = []
        for _ in range(3):
            before = sectors_read(mp)
            assert sha256(disk, 256 << 10) == image["sha"]
            fetched.append((sectors_read(mp) - before) * 512)
        result["fetched"] = fetched
        log(f"fetched upstream per full read: {fetched}")
    with step("a private write: the snapshot keeps it, the origin and cache do not see it"):
        data = os.urandom(MIB)
        write_at(disk, MIB, data)
        assert read_at(disk, MIB, MIB) == data
        result["private"] = {
            "readback": read_at(disk, MIB, MIB) == data,
            "disk_differs": sha256(disk) != image["sha"],
            "cached": sha256(f"/dev/mapper/cached_{IMAGE}") == image["sha"],
            "origin": sha256(f"/dev/mapper/origin_{IMAGE}") == image["sha"],
        }
    board_set(f"{ROLE}-built")
    if ROLE == "A":
        board_get("C-built")
        with step("kill -9 virtmanserver and restart: tables, targets, list() adopted"):
            result["lio_sessions"] = list(LioTargets().sessions(IQN))
            before, listed = kernel_state(), virtman.rpc.list()
            virtman.kill9()
            result["restart_s"] = virtman.start()
            time.sleep(3)  # a heartbeat after the reconcile
            after, relisted = kernel_state(), virtman.rpc.list()
            result["restart"] = {
                "list_before": listed,
                "list_after": relisted,
                "same_tables": before["dm"] == after["dm"],
                "same_sessions": before["sessions"] == after["sessions"],
                "same_lio": before["lio"] == after["lio"],
                "before": before,
                "after": after,
            }
            assert listed == relisted and before == after, result["restart"]
        board_set("A-restarted")
    wait_for = {"C": "A-restarted", "B": "C-done", "A": "B-done"}[ROLE]
    board_get(wait_for)
    with step(f"destroy {vm}, stop virtmanserver: nothing left"):
        result["destroy"] = virtman.rpc.destroy(vm)
        result["stop_rc"] = virtman.stop()
        result["left"] = kernel_state()
        log(f"left: {result['left']}")
    board_set(f"{ROLE}-done")


def main() -> int:
    rc = 1
    try:
        image_server() if ROLE == "S" else compute()
        rc = 0
    except BaseException:
        traceback.print_exc()
        result["error"] = traceback.format_exc()
    finally:
        result["rc"] = rc
        result["total_s"] = round(time.monotonic() - T0, 1)
        (OUT / "result.json").write_text(json.dumps(result, indent=1, default=str))
        log(f"rc={rc} total {result['total_s']}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
'''


def entry_points() -> dict[str, bytes]:
    """A dist-info for the payload's copy of the project: volt-api finds its executors
    through entry points, and the guest has the code but no installed distribution."""
    cfg = configparser.ConfigParser()
    cfg.read(CHECKOUT / "setup.cfg")
    text = "".join(
        f"[{group}]\n" + "".join(f"{line.strip()}\n" for line in value.splitlines() if line)
        for group, value in cfg["options.entry_points"].items()
    )
    info = "project/vmthunder-0.0.0.dist-info"
    return {
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: vmthunder\nVersion: 0.0.0\n",
        f"{info}/entry_points.txt": text.encode(),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    guest = build_guest()
    payload = tmp_path_factory.mktemp("payload")
    (payload / "run.sh").write_text(RUN_SH)
    (payload / "run.sh").chmod(0o755)
    (payload / "dmguest.py").write_text(GUEST)
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    started = time.monotonic()
    result = run_guests(
        guest,
        NODES,
        payload,
        timeout_s=720,
        append=[f"ci.size={SIZE_MIB}"],
        work_dir=WORK_DIR,
        extra_files=entry_points(),
        fail_grace_s=30,
    )
    print(result.summary(), f"(wall {time.monotonic() - started:.1f} s)")
    for node in result.nodes.values():
        if not node.ok:
            print(f"--- {node.node.name} console ---\n{node.console_text()[-20000:]}")
    return result


@pytest.fixture(scope="module")
def report(run: RunResult) -> dict[str, dict[str, Any]]:
    found = {}
    for name, node in run.nodes.items():
        try:
            found[name] = json.loads(node.result_text("result.json"))
        except (OSError, ValueError, TypeError):
            found[name] = {}
    return found


@pytest.mark.timeout(900)
def test_every_guest_passes(run: RunResult, report: dict[str, dict[str, Any]]) -> None:
    for name in run.nodes:
        steps = report[name].get("steps", [])
        print(name, [(s["step"][:40], s["ok"], s["s"]) for s in steps])
    assert run.ok, run.summary() + "".join(
        f"\n{n}: {r.get('error', '')}" for n, r in report.items() if r.get("error")
    )


@pytest.mark.timeout(900)
def test_each_snapshot_reads_the_image_and_keeps_its_writes(
    report: dict[str, dict[str, Any]],
) -> None:
    for name in "ABC":
        r = report[name]
        assert r.get("create") == f"0:/dev/mapper/snapshot_vm-{name.lower()}", r.get("error")
        assert r["list"] == [f"vm-{name.lower()}:volume-img"]
        assert r["private"] == {
            "readback": True,
            "disk_differs": True,
            "cached": True,
            "origin": True,
        }


@pytest.mark.timeout(900)
def test_the_grandchild_reads_through_its_parents_lio_relay(
    report: dict[str, dict[str, Any]],
) -> None:
    assert report["A"]["paths"] == ["10.77.0.1:3260"]  # A and B read the image server
    assert report["B"]["paths"] == ["10.77.0.1:3260"]
    assert report["C"]["paths"] == ["10.77.0.2:3260", "10.77.0.3:3260"]  # A, then B standby
    assert report["A"]["lio_sessions"] == ["iqn.2026-12.org.vmthunder.guestkit:c"]


@pytest.mark.timeout(900)
def test_a_parent_path_going_down_fails_no_read(report: dict[str, dict[str, Any]]) -> None:
    failover = report["C"]["failover"]
    print(failover)
    assert failover["errors"] == []
    assert failover["sha_ok"]
    assert failover["failed_paths_seen"]  # the path to A did fail ...
    assert failover["read_mib"] == SIZE_MIB > failover["down_at_mib"]  # ... under the reads
    after = failover["status_after"]  # the path is reinstated, the first group used again
    assert "active=False" not in after and after.index("state='A'") < after.index("state='E'")


@pytest.mark.timeout(900)
def test_kill9_of_virtman_then_restart_adopts_everything(
    report: dict[str, dict[str, Any]],
) -> None:
    restart = report["A"]["restart"]
    assert restart["list_before"] == restart["list_after"] == ["vm-a:volume-img"]
    assert restart["same_tables"] and restart["same_sessions"] and restart["same_lio"]
    assert restart["before"]["lio"] == ["iqn.2010-10.org.openstack:volume-img"]


@pytest.mark.timeout(900)
def test_teardown_leaves_no_table_session_target_or_loop(
    report: dict[str, dict[str, Any]],
) -> None:
    for name in "ABC":
        r = report[name]
        assert r["destroy"] == "0:" and r["stop_rc"] == 0
        assert r["left"] == {
            "dm": ["No devices found"],
            "sessions": [],
            "lio": [],
            "lio_storage": [],
            "loops": [],
            "bcache_sets": [],
        }, name


@pytest.mark.timeout(900)
def test_bcache_serves_the_second_read_locally(report: dict[str, dict[str, Any]]) -> None:
    # A and B read the image server: the first read fetches the image once, later reads
    # what bcache dropped (see docs/dm-driver.rst). C's first read was the failover read.
    for name in "AB":
        first, second, third = report[name]["fetched"]
        print(name, "fetched upstream per full read:", report[name]["fetched"])
        assert SIZE * 0.9 <= first <= SIZE
        assert second <= SIZE * 0.05
        assert third <= second
    assert max(report["C"]["fetched"]) <= SIZE * 0.05


@pytest.mark.timeout(900)
def test_cache_engine_measurement(run: RunResult) -> None:
    """The comparison behind the choice (docs/dm-driver.rst), on 16 MiB: bytes fetched
    upstream by three full sequential reads of a fresh cache."""
    rows = json.loads(run["S"].result_text("measure.json"))
    fetched = {
        (r["engine"], r["pattern"]): [p["upstream_bytes"] for p in r["passes"]] for r in rows
    }
    for (engine, pattern), passes in sorted(fetched.items()):
        print(f"{engine:60} {pattern:18} {passes}")
    size = 16 << 20
    seq = "sequential 1 MiB"
    smq = fetched[("dm-cache smq, 256 KiB blocks (default)", seq)]
    big = fetched[("bcache writethrough, sequential_cutoff 0, 64 GiB cache", seq)]
    writecache = fetched[("dm-writecache", seq)]
    assert smq[0] >= size * 0.9 and smq[1] >= size * 0.5  # smq: not cache on read
    # ~0.8 MB stay missing next to what udev's probes cached (one insert per request)
    assert big[0] <= size and big[1] <= size * 0.1 and big[2] <= big[1]
    assert writecache == [size, size, size]  # a write cache: every read goes upstream
