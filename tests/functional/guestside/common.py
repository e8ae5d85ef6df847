"""What every guest of the guest tests shares; runs inside the guests as /ci/guestside/.

The role is ``$CI_role``; node addresses come from guestkit's ``/ci/guestkit/nodes``. Node
S serves a coordination board on tcp/9999 (SET/GET of keys, GET waits) and the images
(tgtd, CHAP) and volt-api; the compute nodes run OUR virtmanserver and talk to it through
its XML-RPC API on 127.0.0.1. Each node writes /ci/out/result.json. Every address used is a
guest address on the run's bridge.
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
import threading
import time
import traceback
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path

ROLE = os.environ.get("CI_role", "?")  # noqa: SIM112 (guestkit: ci.KEY -> CI_KEY)
OUT = Path("/ci/out")
MIB = 1 << 20
SIZE_MIB = int(os.environ.get("CI_size", "48"))  # noqa: SIM112
IPS = {
    line.split()[0]: line.split()[3].split("/")[0]
    for line in Path("/ci/guestkit/nodes").read_text().splitlines()
    if line.strip()
}
BOARD = (IPS["S"], 9999)
BOARD_WAIT_S = 2100.0  # a guest may wait on another for most of the run (guestruns.SUITE_TIMEOUT_S)
IQN_PREFIX = "iqn.2010-10.org.openstack:"
CHAP_USER, CHAP_PASSWORD = "vmt-chap", "s3cret-Chap-pw-42"
# the guests' cluster-wide NBD pre-shared key (QEMU keys.psk format), a test-only secret
NBD_PSK_IDENTITY = "vmt-guests"
NBD_PSK_FILE = Path("/run/vmt-nbd-psk/keys.psk")
NBD_PSK = f"{NBD_PSK_IDENTITY}:{hashlib.sha256(b'vmt-guests-nbd-key').hexdigest()}\n"
TOKEN = "volt-token-for-the-guests"
RPC = "http://127.0.0.1:7774/RPC2"
T0 = time.monotonic()
result: dict = {"role": ROLE, "steps": []}


def log(msg: str) -> None:
    print(f"[{ROLE} {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
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


def main(role_main: Callable[[], None]) -> int:
    """Run this node's part; whatever happens, write /ci/out/result.json."""
    rc = 1
    try:
        role_main()
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


# -- the board (S serves it; everyone waits on it) ---------------------------------------------
class Board(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("0.0.0.0", BOARD[1]), BoardHandler)
        self.values: dict[str, str] = {}
        self.cond = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, daemon=True).start()


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
            board.cond.wait_for(lambda: key in board.values, timeout=BOARD_WAIT_S)
            self.wfile.write((board.values.get(key, "") + "\n").encode())


def board(line: str, timeout: float = BOARD_WAIT_S) -> str:
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


# -- S: the images and volt-api -----------------------------------------------------------------
class ImageServer:
    """tgtd serving one random image per name (CHAP, read-only, LUN 1), and volt-api
    (balanced, fan-out 2, 2 parents per node)."""

    def __init__(self, images: list[str]) -> None:
        from brick.tgt import TgtDaemon

        self.images = images
        self.tgtd = TgtDaemon(0, [f"{IPS['S']}:3260"], run_dir=Path("/run/tgt"))
        self.volt: subprocess.Popen[bytes] | None = None

    def serve(self) -> dict[str, str]:
        """Start tgtd with the images; returns each image's sha256."""
        from brick.tgt import Chap

        shas = {}
        with step("image files and tgtd targets (CHAP, read-only)"):
            Path("/run/img").mkdir()
            self.tgtd.start(timeout_s=60)  # a TCG guest on a loaded host: seconds per tgtadm
            for image in self.images:
                data = os.urandom(SIZE_MIB * MIB)
                path = Path(f"/run/img/{image}.img")
                path.write_bytes(data)
                shas[image] = hashlib.sha256(data).hexdigest()
                self.tgtd.adm.create_target(
                    IQN_PREFIX + image,
                    path,
                    lun=1,
                    readonly=True,
                    chap=Chap(CHAP_USER, CHAP_PASSWORD),
                )
        return shas

    def start_volt(self) -> None:
        with step("volt-api (balanced, fan-out 2, 2 parents per node)"):
            Path("/run/volt").mkdir()
            # node_timeout: no test here waits for an eviction, and a virtmanserver that
            # is killed and started again takes 60-160 s in a TCG guest on a loaded host:
            # at 60 s Volt evicted it mid-restart once, and it came back under new parents.
            Path("/run/volt/volt.conf").write_text(
                f"[DEFAULT]\nbind_host = {IPS['S']}\nbind_port = 7447\nnode_timeout = 600\n"
                "default_executor = balanced\n[auth]\n"
                f"token = {TOKEN}\n[database]\nconnection = sqlite:////run/volt/volt.sqlite\n"
            )
            self.volt = subprocess.Popen(
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
                    with urllib.request.urlopen(request, timeout=5) as answer:
                        if answer.status == 200:
                            return
                except OSError:
                    if self.volt.poll() is not None or time.monotonic() > deadline:
                        raise
                time.sleep(0.5)

    def stop(self) -> None:
        with step("volt-api and tgtd stop"):
            if self.volt is not None:
                self.volt.send_signal(signal.SIGTERM)
                self.volt.wait(timeout=60)
            for image in self.images:
                self.tgtd.adm.delete_target(IQN_PREFIX + image)
            self.tgtd.stop()


# -- compute nodes ---------------------------------------------------------------------------------
class Virtman:
    """virtmanserver with the given driver settings, started (and killed) by PID."""

    def __init__(self, driver_conf: str) -> None:
        NBD_PSK_FILE.parent.mkdir(mode=0o700, exist_ok=True)
        NBD_PSK_FILE.write_text(NBD_PSK)
        NBD_PSK_FILE.chmod(0o600)
        self.conf = Path("/run/virtman.conf")
        self.conf.write_text(
            "[DEFAULT]\n"
            f"host_ip = {IPS[ROLE]}\nmaster_ip = {IPS['S']}\nmaster_token = {TOKEN}\n"
            "heartbeat_interval = 2\nstate_dir = /run/vmt-state\n"
            "run_dir = /run/virtman\nlisten_host = 127.0.0.1\nlisten_port = 7774\n"
            "auth_strategy = noauth\n"  # the guest's own loopback: no other caller
            f"chap_user = {CHAP_USER}\nchap_password = {CHAP_PASSWORD}\n"
            f"nbd_psk_file = {NBD_PSK_FILE}\n"
            "parent_wait_timeout = 120\n"
            f"log_dir = {OUT}\nlog_file = virtman.log\ndebug = true\n" + driver_conf
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


def image_connection(image: str) -> dict:
    """The image server's target of ``image``, as Virtman's create() takes it."""
    return {"target_portal": f"{IPS['S']}:3260", "target_iqn": IQN_PREFIX + image, "target_lun": 1}


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


def multipath_path_devices(image: str) -> list[tuple[str, str]]:
    """(portal, /dev/sdX) of multipath_<image>'s paths, in table order (first = reads)."""
    from brick.dm import DeviceMapper
    from brick.dm.parse import parse_multipath_table

    table = DeviceMapper().table(f"multipath_{image}")[0]
    paths = []
    for devno in parse_multipath_table(table.args).paths:
        real = os.path.realpath(f"/sys/dev/block/{devno}")
        session = next(p for p in real.split("/") if p.startswith("session"))
        conn = Path(f"/sys/class/iscsi_session/{session}/device")
        address = next(conn.glob("connection*/iscsi_connection/*/persistent_address"))
        port = address.with_name("persistent_port")
        portal = f"{address.read_text().strip()}:{port.read_text().strip()}"
        paths.append((portal, f"/dev/{os.path.basename(real)}"))
    return paths


def multipath_paths(image: str) -> list[str]:
    """The portals of multipath_<image>'s paths, in table order (first = reads)."""
    return [portal for portal, _ in multipath_path_devices(image)]
