"""The guests of tests/functional/test_dm_guests.py; the role is $CI_role.

S: the image server and volt-api (common.ImageServer), then the cache-engine measurement.
A, B, C: compute nodes running virtmanserver with driver = dm, each creating one VM disk
through its own XML-RPC API. Balanced placement (fan-out 2) puts A and B under the image
server and C under A, with B as C's standby parent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from common import (
    IPS,
    IQN_PREFIX,
    MIB,
    OUT,
    ROLE,
    Board,
    ImageServer,
    Reader,
    Virtman,
    board_get,
    board_set,
    image_connection,
    kernel_state,
    log,
    main,
    multipath_paths,
    read_at,
    result,
    sectors_read,
    sh,
    sha256,
    step,
    write_at,
)

IMAGE = "volume-img"
IQN = IQN_PREFIX + IMAGE
DM_CONF = "driver = dm\ndm_cache_size_mib = 65536\n"
ENGINES = ("256 KiB blocks (default)", "bcache", "writecache")


def image_server() -> None:
    Board().start()
    server = ImageServer([IMAGE])
    shas = server.serve()
    server.start_volt()
    board_set("image", {"sha": shas[IMAGE]})
    board_get("C-built")  # the failover is over: the measurement may take CPU now
    argv = [sys.executable, "/ci/cache_engines.py", "--size-mib", "16"]  # bench/, copied
    argv += ["--passes", "3", "--json", str(OUT / "measure.json")]
    argv += [arg for engine in ENGINES for arg in ("--engine", engine)]
    measure = subprocess.Popen(argv)
    board_get("A-done")
    board_get("C-contract-done")  # C's layer contract reads this image server
    server.stop()
    with step("cache engines: bytes fetched upstream, first and later reads"):
        assert measure.wait(timeout=400) == 0


def failover(disk: str, mp: str, image: dict) -> None:
    """Read C's disk while the route to A (the first path) is black-holed, then restore it
    and wait for the driver to reinstate the path and fail back."""
    from brick.dm import DeviceMapper

    a = IPS["A"]
    reader = Reader(disk, pause_s=0.1)
    reader.start()
    while reader.done < 6 and reader.is_alive():
        time.sleep(0.05)
    sh("ip", "route", "add", "blackhole", f"{a}/32")
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
    sh("ip", "route", "del", "blackhole", f"{a}/32")
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


def restart_adopts(virtman: Virtman) -> None:
    from brick.lio import LioTargets

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


def layer_contract(virtman: Virtman, image: dict) -> None:
    """The layer contract (contract.py, the same cases the qemu driver passes on the host)
    against a DmDriver of this process, once virtmanserver has stopped here: each case's
    outcome goes to the report (nothing raises here: the image server waits for this node)."""
    import contract

    from virtman import conf
    from virtman.drivers.dm.driver import DmDriver
    from virtman.layers.base import Endpoint

    outcome: dict[str, str] = {}
    result["contract"] = outcome
    try:
        conf.load(config_files=[str(virtman.conf)], prog="contract")
        driver = DmDriver(conf.settings_from_conf(), monitor_interval_s=0)
        driver.start()
    except Exception as exc:
        outcome["start"] = repr(exc)
        return
    endpoints = (Endpoint(f"{IPS['S']}:3260", IQN, 1),)
    rig = contract.Rig(driver, IMAGE, endpoints, IQN, image["sha"], lambda d: sha256(d.path))
    t = time.monotonic()
    try:
        outcome.update(contract.run_all(rig))
    except Exception as exc:  # a teardown that failed
        outcome["run"] = repr(exc)
    result["contract_s"] = round(time.monotonic() - t, 1)
    log(f"contract: {outcome} ({result['contract_s']}s)")
    try:
        driver.stop()
    except Exception as exc:
        outcome["stop"] = repr(exc)


def compute() -> None:
    vm = f"vm-{ROLE.lower()}"
    virtman = Virtman(DM_CONF)
    with step("virtmanserver starts (dm driver: modules, bcache cache set)"):
        result["start_s"] = virtman.start()
    image = board_get("image")
    assert isinstance(image, dict)
    # Only the order of the creates (the registrations) shapes the tree: each node's reads
    # and checks run beside the next node's create.
    if ROLE == "B":
        board_get("A-created")
    if ROLE == "C":
        board_get("B-created")
    with step(f"create {vm} through XML-RPC"):
        t = time.monotonic()
        answer = virtman.rpc.create(vm, IMAGE, image_connection(IMAGE))
        result["create"] = answer
        result["create_s"] = round(time.monotonic() - t, 1)
        assert answer == f"0:/dev/mapper/snapshot_{vm}", answer
    board_set(f"{ROLE}-created")
    disk = f"/dev/mapper/snapshot_{vm}"
    mp = f"/dev/mapper/multipath_{IMAGE}"
    result["paths"] = multipath_paths(IMAGE)
    result["list"] = virtman.rpc.list()
    if ROLE == "C":
        with step("reads while the first parent path (A) goes down: no read error"):
            failover(disk, mp, image)
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
            restart_adopts(virtman)
        board_set("A-restarted")
    board_get({"C": "A-restarted", "B": "C-done", "A": "B-done"}[ROLE])
    with step(f"destroy {vm}, stop virtmanserver: nothing left"):
        result["destroy"] = virtman.rpc.destroy(vm)
        result["stop_rc"] = virtman.stop()
        result["left"] = kernel_state()
        log(f"left: {result['left']}")
    board_set(f"{ROLE}-done")
    if ROLE == "C":  # off the others' critical path: they finish while it runs
        with step("the layer contract on the dm driver (contract.py), after virtmanserver"):
            layer_contract(virtman, image)
            result["contract_left"] = kernel_state()
        board_set("C-contract-done")


if __name__ == "__main__":
    sys.exit(main(image_server if ROLE == "S" else compute))
