"""The guests of tests/functional/test_mixed_guests.py; the role is $CI_role.

S serves two images and volt-api. A and B run virtmanserver with driver = dm, Q with
driver = qemu. Balanced placement (fan-out 2) puts the first two nodes of an image under
the image server and the third under the first, with the second as its standby parent:

- volume-img1, created on A, B, then Q: Q (qemu) reads through A's NBD relay
  (dm_nbd_relay); A's NBD daemon is killed while Q reads, and Q's reads move to B;
  Q also reads A's LIO relay once over libiscsi;
- volume-img2, created on Q, B, then A: A (dm) reads through Q's tgtd relay (open-iscsi).

Only the order of each image's creates (the registrations) shapes its tree: a node signals
``<role>-created-<n>`` right after its create, and its checks run beside the next create.

B relays with dm_relay = tgt: it is the standby parent of both children (Q reads it over
libiscsi), and A reads volume-img2 once straight from its path to B.

Teardown goes children first (Q's img1 VM, then A's img2 VM), then everything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import (
    CHAP_PASSWORD,
    CHAP_USER,
    IPS,
    IQN_PREFIX,
    MIB,
    NBD_PSK_FILE,
    NBD_PSK_IDENTITY,
    ROLE,
    Board,
    ImageServer,
    Virtman,
    board_get,
    board_set,
    image_connection,
    kernel_state,
    log,
    main,
    multipath_path_devices,
    multipath_paths,
    read_at,
    result,
    sh,
    sha256,
    step,
    write_at,
)

IMG1, IMG2 = "volume-img1", "volume-img2"
# The parent watch is off: with it, Q would report A's killed NBD relay and Volt would evict
# A until it rejoins (docs/bus.rst); this test keeps the trees still to show the relays.
NO_PARENT_WATCH = "parent_check_interval = 0\n"
DRIVER_CONF = {
    "A": "driver = dm\ndm_cache_size_mib = 65536\ndm_nbd_relay = true\n" + NO_PARENT_WATCH,
    "B": "driver = dm\ndm_cache_size_mib = 65536\ndm_relay = tgt\n" + NO_PARENT_WATCH,
    "Q": "driver = qemu\n" + NO_PARENT_WATCH,
}
STATE = Path("/run/vmt-state")
RUN = Path("/run/virtman")
NBD_PIDFILE = RUN / "virtman-dm-nbd.pid"


def image_server() -> None:
    Board().start()
    server = ImageServer([IMG1, IMG2])
    shas = server.serve()
    server.start_volt()
    board_set("images", shas)
    for role in "ABQ":
        board_get(f"{role}-done")
    server.stop()


def create(virtman: Virtman, vm: str, image: str) -> str:
    """Create ``vm`` on ``image`` through XML-RPC; returns the disk's path."""
    with step(f"create {vm} on {image} through XML-RPC"):
        t = time.monotonic()
        answer = virtman.rpc.create(vm, image, image_connection(image))
        result.setdefault("create", {})[vm] = answer
        result.setdefault("create_s", {})[vm] = round(time.monotonic() - t, 1)
        assert answer.startswith("0:"), answer
    return answer[2:]


# -- dm nodes (A, B) ---------------------------------------------------------------------------
def check_dm_disk(vm: str, image: str, sha: str) -> dict:
    """The snapshot reads the image; a private write stays in it."""
    disk = f"/dev/mapper/snapshot_{vm}"
    with step(f"{vm}: the image's bytes; a private write stays private"):
        read = sha256(disk) == sha
        data = os.urandom(MIB)
        write_at(disk, MIB, data)
        return {
            "sha_ok": read,
            "readback": read_at(disk, MIB, MIB) == data,
            "disk_differs": sha256(disk) != sha,
            "origin": sha256(f"/dev/mapper/origin_{image}") == sha,
        }


def dm_node(virtman: Virtman, shas: dict) -> None:
    me = ROLE.lower()
    if ROLE == "B":
        board_get("A-created-1")
    create(virtman, f"vm-{me}1", IMG1)
    board_set(f"{ROLE}-created-1")
    result["img1"] = {"paths": multipath_paths(IMG1)}
    result["img1"].update(check_dm_disk(f"vm-{me}1", IMG1, shas[IMG1]))
    if ROLE == "A":
        kill_nbd_relay(virtman, shas[IMG1])
    board_get("Q-created-2" if ROLE == "B" else "B-created-2")
    create(virtman, f"vm-{me}2", IMG2)
    board_set(f"{ROLE}-created-2")
    result["img2"] = {"paths": multipath_paths(IMG2)}
    result["img2"].update(check_dm_disk(f"vm-{me}2", IMG2, shas[IMG2]))
    if ROLE == "A":
        with step("volume-img2 read straight from the standby path (B's tgtd relay)"):
            portal, device = multipath_path_devices(IMG2)[1]
            result["img2"]["standby"] = [portal, sha256(device) == shas[IMG2]]
    board_set(f"{ROLE}-2")
    board_get("Q-checked")
    if ROLE == "B":
        result["tgt_connections"] = tgt_connections()
    if ROLE == "A":
        board_get("Q-destroyed-1")
        with step("destroy vm-a2 (Q's child on volume-img2)"):
            result["destroy_child"] = virtman.rpc.destroy("vm-a2")
        board_set("A-destroyed-2")
    else:
        board_get("A-destroyed-2")
    with step("destroy the rest, stop virtmanserver: nothing left"):
        vms = [entry.partition(":")[0] for entry in virtman.rpc.list()]
        result["destroy"] = [virtman.rpc.destroy(vm) for vm in vms]
        result["stop_rc"] = virtman.stop()
        result["left"] = {**kernel_state(), "daemons": daemons()}
        log(f"left: {result['left']}")
    board_set(f"{ROLE}-done")


def nbd_daemon_pid() -> int | None:
    try:
        pid = int(NBD_PIDFILE.read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def kill_nbd_relay(virtman: Virtman, sha: str) -> None:
    """While Q reads volume-img1 through A's NBD relay: kill -9 the NBD daemon, with
    virtman paused so that it cannot start it again before Q has read the rest from B;
    then let virtman heal it and read the export back over NBD."""
    from brick.lio import LioTargets
    from brick.proc import established_connections

    board_get("Q-reading-1")
    info: dict = {"clients_before": established_connections(10809)}
    # Q reads through this node now, over NBD only (its one LIO read comes after A-nbd-back)
    result["img1"]["lio_sessions"] = list(LioTargets().sessions(IQN_PREFIX + IMG1))
    assert virtman.proc is not None
    with step("kill -9 the NBD relay daemon while Q reads (virtman paused)"):
        os.kill(virtman.proc.pid, signal.SIGSTOP)
        pid = nbd_daemon_pid()
        assert pid is not None, "no NBD relay daemon"
        os.kill(pid, signal.SIGKILL)
        info["killed_pid"] = pid
        board_set("A-nbd-down")
    board_get("Q-read-1")
    with step("virtman resumes and starts the NBD relay again; its export reads back"):
        t = time.monotonic()
        os.kill(virtman.proc.pid, signal.SIGCONT)
        while (new := nbd_daemon_pid()) in (None, pid) and time.monotonic() - t < 60:
            time.sleep(0.2)
        out = Path("/run/nbd-back.raw")
        creds = (
            f"tls-creds-psk,id=t0,endpoint=client,dir={NBD_PSK_FILE.parent},"
            f"username={NBD_PSK_IDENTITY}"
        )
        source = f"driver=nbd,server.type=inet,server.host={IPS['A']},server.port=10809,"
        source += f"export={IMG1},tls-creds=t0"  # the relay serves TLS with the key only
        argv = ["qemu-img", "convert", "--object", creds, "--image-opts", source, "-O", "raw"]
        while time.monotonic() - t < 60:  # the export follows the daemon's start
            done = subprocess.run(
                [*argv, str(out)],
                capture_output=True,
                check=False,
            )
            if done.returncode == 0:
                break
            time.sleep(0.5)
        info["healed_s"] = round(time.monotonic() - t, 1)
        info["new_pid"] = new
        info["sha_ok"] = out.exists() and file_sha(out) == sha
        out.unlink(missing_ok=True)
    result["nbd_relay"] = info
    board_set("A-nbd-back")


# -- the qemu node (Q) -------------------------------------------------------------------------
def disk_sha(path: str) -> str:
    """sha256 of the qcow2 disk's guest-visible bytes (as a VM would read them)."""
    raw = Path("/run/disk.raw")
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, str(raw))
    try:
        return file_sha(raw)
    finally:
        raw.unlink()


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_qemu_disk(disk: str, image: str, sha: str) -> dict:
    origin = RUN / "exports" / f"{image}.raw"
    with step(f"{Path(disk).name}: the image's bytes; a private write stays private"):
        read = disk_sha(disk) == sha
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 1M", disk)
        readback = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 1M", disk],
            capture_output=True,
            text=True,
            check=False,
        )
        return {
            "sha_ok": read,
            "readback": readback.returncode == 0
            and "Pattern verification failed" not in (readback.stdout + readback.stderr),
            "disk_differs": disk_sha(disk) != sha,
            "origin": file_sha(origin) == sha,
        }


def qemu_paths(image: str) -> list[str]:
    """The quorum's paths, in order (the first carries the reads): ``nbd://host:port`` or
    the iSCSI portal."""
    entries = json.loads((RUN / "paths" / f"{image}.json").read_text())
    return [f"nbd://{e['nbd']}" if e.get("nbd") else e["portal"] for e in entries]


def read_through_failover(image: str, sha: str) -> dict:
    """Read Q's origin of ``image`` (its FUSE export; nothing of it is cached yet) in 1 MiB
    reads: 4 MiB from A, then A's NBD daemon is killed, then the rest."""
    origin = RUN / "exports" / f"{image}.raw"
    h = hashlib.sha256()
    errors: list[str] = []
    stall = 0.0
    with step(f"read {image} while A's NBD relay dies: no read error"), open(origin, "rb") as f:
        offset, signalled = 0, False
        while True:
            if offset == 4 * MIB and not signalled:
                board_set("Q-reading-1")
                board_get("A-nbd-down")
                signalled = True
            t = time.monotonic()
            try:
                chunk = os.pread(f.fileno(), MIB, offset)
            except OSError as exc:
                errors.append(f"{exc.strerror} at {offset >> 20} MiB")
                if len(errors) > 5:
                    break
                continue
            stall = max(stall, time.monotonic() - t)
            if not chunk:
                break
            h.update(chunk)
            offset += len(chunk)
        if not signalled:  # A must not wait for ever
            board_set("Q-reading-1")
        board_set("Q-read-1")
    return {"errors": errors, "max_stall_s": round(stall, 1), "sha_ok": h.hexdigest() == sha}


def read_lio_relay(image: str, sha: str) -> bool:
    """Read A's LIO relay of ``image`` once over libiscsi (qemu-img, CHAP, the qemu
    driver's initiator name): LIO and libiscsi talk."""
    out = Path("/run/lio.raw")
    target = (
        f"driver=iscsi,transport=tcp,portal={IPS['A']}:3260,target={IQN_PREFIX}{image},"
        f"lun=1,user={CHAP_USER},password-secret=chap,"
        f"initiator-name=iqn.2010-10.org.vmthunder:{IPS['Q']}"
    )
    with step(f"read A's LIO relay of {image} over libiscsi"):
        sh(
            "qemu-img", "convert", "--object", f"secret,id=chap,data={CHAP_PASSWORD}",
            "-O", "raw", "--image-opts", target, str(out),
        )  # fmt: skip
        try:
            return file_sha(out) == sha
        finally:
            out.unlink()


def daemons() -> list[str]:
    """The qemu-storage-daemon and tgtd processes running now."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0) in (b"qemu-storage-daemon", b"tgtd"):
            found.append(argv0.decode())
    return found


def tgt_connections() -> dict[str, list[list[str]]]:
    """Per image, the [initiator, address] of each session on this node's tgtd relay."""
    from brick.tgt import TgtAdm

    tgt = TgtAdm(3260)
    return {
        image: sorted([c.initiator, c.address] for c in tgt.connections(IQN_PREFIX + image))
        for image in (IMG1, IMG2)
    }


def qemu_state() -> dict:
    """What a qemu node has now: our daemons, FUSE mounts, cache and instance files."""
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if "fuse" in line]
    files = sorted(
        str(p)
        for top in (STATE / "cache", STATE / "instances", RUN / "exports", RUN / "paths")
        if top.is_dir()
        for p in top.iterdir()
    )
    return {"daemons": daemons(), "fuse_mounts": mounts, "files": files}


def qemu_node(virtman: Virtman, shas: dict) -> None:
    disk2 = create(virtman, "vm-q2", IMG2)  # Q heads volume-img2's tree
    board_set("Q-created-2")
    result["img2"] = {"disk": disk2, "paths": qemu_paths(IMG2)}
    board_get("B-created-1")
    disk1 = create(virtman, "vm-q1", IMG1)
    result["img1"] = {"disk": disk1, "paths": qemu_paths(IMG1)}
    result["img1"]["failover"] = read_through_failover(IMG1, shas[IMG1])
    board_get("A-nbd-back")
    result["img1"]["lio_read"] = read_lio_relay(IMG1, shas[IMG1])
    result["img1"].update(check_qemu_disk(disk1, IMG1, shas[IMG1]))
    result["img2"].update(check_qemu_disk(disk2, IMG2, shas[IMG2]))
    board_get("A-2")
    result["tgt_connections"] = tgt_connections()
    board_set("Q-checked")
    with step("destroy vm-q1 (A's child on volume-img1)"):
        result["destroy_child"] = virtman.rpc.destroy("vm-q1")
    board_set("Q-destroyed-1")
    board_get("A-destroyed-2")
    with step("destroy vm-q2, stop virtmanserver: nothing left"):
        result["destroy"] = [virtman.rpc.destroy("vm-q2")]
        result["stop_rc"] = virtman.stop()
        result["left"] = qemu_state()
        log(f"left: {result['left']}")
    board_set("Q-done")


def compute() -> None:
    virtman = Virtman(DRIVER_CONF[ROLE])
    kind = "qemu driver: qemu-storage-daemon, tgtd" if ROLE == "Q" else "dm driver"
    with step(f"virtmanserver starts ({kind})"):  # while the image server starts
        result["start_s"] = virtman.start()
    shas = board_get("images")
    assert isinstance(shas, dict)
    qemu_node(virtman, shas) if ROLE == "Q" else dm_node(virtman, shas)


if __name__ == "__main__":
    assert set(IPS) == {"S", "A", "B", "Q"}, IPS
    sys.exit(main(image_server if ROLE == "S" else compute))
