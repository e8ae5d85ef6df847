"""Issue 13 item 5: live migration that moves only writes, on real nodes.

Two virtmanservers (qemu driver), each exporting the tiny image itself, each with its own
libvirtd: ``na`` on the test libvirtd, ``nb`` on a peer libvirtd in its own mount namespace
(tests/functional/libvirtpeer.py; libvirt refuses to migrate to the daemon it runs on). A
one-VM cluster runs on ``na``; its guest writes ``WRITE_MIB`` MiB and ticks.
``POST /v1/vms/{id}/migrate`` moves it to ``nb``: ``nb`` builds its own stack of the image
and a new snapshot, libvirt copies only the overlay (non-shared incremental), the guest
ticks on on ``nb`` and reads its written file back from ``nb``'s disk (same sha256), ``na``
keeps nothing. The bytes moved are about the writes, far from the disk's size. Bad
destinations are 400 with nothing dispatched. Then a migration back that ``nb``'s own
limits abort (``guest_migration_timeout = 1`` s at 4 MiB/s) leaves the guest ticking on
``nb`` and nothing on ``na``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brick.wait import wait_until
from tests.functional import vmfixtures
from tests.functional.libvirtpeer import PeerLibvirtd
from tests.functional.test_cluster_controller import stop_all
from tests.functional.virtmanproc import VirtmanProcess
from tests.functional.vmfixtures import domain_gone
from tests.functional.voltproc import VoltProcess

pytestmark = pytest.mark.functional
libvirt_daemons = vmfixtures.libvirt_daemons
guest_image = vmfixtures.guest_image

LAB = os.environ.get("VMT_TEST_LAB", "vmt")
TGT_BASE = int(os.environ.get("VMT_TEST_TGT_BASE", "3400"))
WRITE_MIB = int(os.environ.get("VMT_MIGRATE_WRITE_MIB", "16"))  # bench/migration.py sweeps it
MIB = 1 << 20
BOOT_S = 120.0


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmt-migrate-") as folder:
        yield Path(folder)


def _console(node: VirtmanProcess, userid: str) -> str:
    return str(node.client(timeout=60).call("guest_console_output", userid))


def _wait_line(node: VirtmanProcess, userid: str, pattern: str, after: int = 0) -> re.Match:
    """The first match of ``pattern`` in the guest's console past character ``after``."""
    return wait_until(
        lambda: re.search(pattern, _console(node, userid)[after:]),
        timeout_s=BOOT_S, what=f"{pattern!r} on {node.workdir.name}", max_interval_s=0.3,
    )  # fmt: skip


def _migrate(volt: VoltProcess, userid: str, destination: str) -> dict[str, Any]:
    status, answer = volt.request("POST", f"/v1/vms/{userid}/migrate", {"destination": destination})
    assert status == 202, answer
    return wait_until(
        lambda: (v := volt.request("GET", f"/v1/vms/{userid}")[1])["migration"]["state"]
        != "migrating" and v,
        timeout_s=120, what=f"{userid}'s migration to {destination}", max_interval_s=0.2,
    )  # fmt: skip


def test_a_running_guest_moves_its_writes_only_and_a_failed_move_leaves_it_where_it_was(
    libvirt_daemons, guest_image, workdir: Path
) -> None:
    started = time.monotonic()
    guest = guest_image
    peer = PeerLibvirtd(
        Path(f"/run/{LAB}-peer-libvirt-{TGT_BASE}"), f"{TGT_BASE:08d}-0000-4000-8000-000000000b0b"
    )
    prefix = f"{LAB}{os.getpid()}-"  # one prefix: a domain keeps its name when it moves
    common = {
        "guest_kernel": guest.kernel,
        "guest_initrd": guest.initrd,
        "guest_cmdline": f"{guest.cmdline} rw vmt.write={WRITE_MIB}",
        "guest_name_prefix": prefix,
        "heartbeat_interval": 1,
    }
    (workdir / "nb").mkdir()
    peer.share(workdir / "nb")  # nb's FUSE exports must show in the peer's namespace
    nodes = {
        "na": VirtmanProcess(workdir / "na", guest_libvirt_uri=libvirt_daemons.uri, **common),
        "nb": VirtmanProcess(
            workdir / "nb",
            guest_libvirt_uri=peer.uri,
            guest_migration_timeout=1,  # its migrations out are aborted: the failure case
            guest_migration_bandwidth=4,
            **common,
        ),
    }
    silent = socket.create_server(("127.0.0.1", 0))  # a node that never answers: down
    nodes_file = workdir / "nodes.json"
    nodes_file.write_text(json.dumps(
        [{"id": name, "url": n.url, "token": n.token, "vcpus": 2, "memory_mb": 512}
         for name, n in nodes.items()]
        + [{"id": "nz", "url": f"http://127.0.0.1:{silent.getsockname()[1]}/RPC2"}]
    ))  # fmt: skip
    (workdir / "volt").mkdir()
    volt = VoltProcess(workdir / "volt", cluster__nodes_file=nodes_file)
    marks: dict[str, float] = {}
    try:
        peer.start()
        marks["peer libvirtd"] = time.monotonic() - started
        for node in nodes.values():
            node.start()
            image = node.image_dir / "tiny.raw"
            shutil.copy(guest.rootfs, image)
            assert node.client().call("create_image_target", "tiny", str(image)).startswith("0:")
        marks["nodes"] = time.monotonic() - started
        volt.start()
        wait_until(
            lambda: [n["status"] for n in volt.request("GET", "/v1/nodes")[1][:2]] == ["up"] * 2,
            timeout_s=15, what="na and nb up", max_interval_s=0.1,
        )  # fmt: skip
        burst = {"image": "tiny", "count": 1, "flavor": {"vcpus": 1, "memory_mb": 128},
                 "nodes": ["na"]}  # fmt: skip
        status, answer = volt.request("POST", "/v1/clusters", burst)
        assert status == 202, answer
        (vm,) = wait_until(
            lambda: (v := volt.request("GET", f"/v1/clusters/{answer['task']}")[1])["status"]
            != "IN_PROGRESS" and v["vms"],
            timeout_s=BOOT_S, what="the VM", max_interval_s=0.2,
        )  # fmt: skip
        assert (vm["status"], vm["node"]) == ("RUNNING", "na"), vm
        marks["vm running"] = time.monotonic() - started
        userid = vm["userid"]
        wrote = _wait_line(nodes["na"], userid, r"VMT-WROTE mib=\d+ sha=(\w+)")
        written_sha = wrote.group(1)
        _wait_line(nodes["na"], userid, r"VMT-TICK n=2\b")
        marks["guest wrote"] = time.monotonic() - started

        # bad destinations: 400 naming the field, nothing dispatched, the VM untouched
        url = f"/v1/vms/{userid}/migrate"
        for destination, detail in [("nq", "unknown node"), ("na", "runs on na already"),
                                    ("nz", "is ")]:  # fmt: skip
            status, err = volt.request("POST", url, {"destination": destination})
            assert status == 400, err
            text = err["errors"][0]["detail"]
            assert "invalid 'destination'" in text and detail in text, text
        assert volt.request("POST", "/v1/vms/VNOSUCH1/migrate", {"destination": "nb"})[0] == 404
        assert volt.request("GET", f"/v1/vms/{userid}")[1]["migration"] is None
        assert nodes["nb"].client().call("guest_list") == []

        # the move: only the writes cross
        t0 = time.monotonic()
        shown = _migrate(volt, userid, "nb")
        move_s = time.monotonic() - t0
        moved = shown["migration"]
        assert (moved["state"], shown["node"], shown["error"]) == ("done", "nb", None), shown
        assert nodes["na"].client().call("guest_list") == []
        assert nodes["nb"].client().call("guest_power_state", userid) == "on"
        assert list((nodes["na"].state_dir / "instances").glob("*.qcow2")) == []
        assert domain_gone(libvirt_daemons.uri, f"vmt-{prefix}{userid}")
        assert peer.domains() == [f"vmt-{prefix}{userid}"]
        # it runs on on nb, and reads back what it wrote from nb's disk
        check = _wait_line(nodes["nb"], userid, r"VMT-CHECK n=\d+ sha=(\w+)")
        assert check.group(1) == written_sha
        marks["checked on nb"] = time.monotonic() - started
        disk, memory = moved["disk_bytes"], moved["memory_bytes"]
        virtual, written = moved["disk_virtual_bytes"], moved["guest_written_bytes"]
        assert written >= WRITE_MIB * MIB and WRITE_MIB * MIB <= disk <= written + 8 * MIB, moved
        assert disk < virtual / 2, moved  # not the image
        assert 0 < memory <= 2 * 128 * MIB and moved["total_bytes"] >= disk + memory, moved

        # a move back that nb aborts: the guest ticks on on nb, nothing is left on na
        t1 = time.monotonic()
        before = len(_console(nodes["nb"], userid))
        shown = _migrate(volt, userid, "na")
        fail_s = time.monotonic() - t1
        assert (shown["migration"]["state"], shown["node"]) == ("failed", "nb"), shown
        assert "guest_migrate on nb" in shown["error"], shown
        assert nodes["nb"].client().call("guest_power_state", userid) == "on"
        _wait_line(nodes["nb"], userid, r"VMT-TICK", after=before)
        assert nodes["na"].client().call("guest_list") == []
        assert nodes["na"].client().call("list") == []
        assert list((nodes["na"].state_dir / "instances").glob("*.qcow2")) == []
        assert domain_gone(libvirt_daemons.uri, f"vmt-{prefix}{userid}")
        states = {n["id"]: n for n in volt.request("GET", "/v1/nodes")[1]}
        assert states["na"]["used"]["vcpus"] == 0 and states["nb"]["vms"] == [vm["name"]]
        print(
            f"\nmigration na -> nb in {move_s:.1f} s: disk {disk / MIB:.1f} MiB (guest wrote "
            f"{written / MIB:.1f} MiB, {WRITE_MIB} MiB of file; overlay "
            f"{moved['disk_allocated_bytes'] / MIB:.1f} MiB), memory {memory / MIB:.1f} MiB, "
            f"total {moved['total_bytes'] / MIB:.1f} MiB, disk virtual size "
            f"{virtual / MIB:.0f} MiB, libvirt {moved['seconds']} s, downtime "
            f"{moved['downtime_ms']} ms; aborted move back {fail_s:.1f} s; "
            f"whole test {time.monotonic() - started:.1f} s; at: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items())
        )
    finally:
        silent.close()
        stop_all(volt, nodes)
        peer.stop()
        peer.unshare_all()
