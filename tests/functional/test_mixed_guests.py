"""A qemu node and dm nodes relaying to each other, on real kernels (guestkit guests).

S runs tgtd (two images, CHAP) and volt-api; A and B run OUR virtmanserver with
driver = dm, Q with driver = qemu. Volt's balanced placement (fan-out 2) makes the third
node of an image the child of the first, so the creation order decides who relays to whom:

- volume-img1 on A, B, then Q: Q's qemu-storage-daemon reads A's NBD relay
  (``dm_nbd_relay``); A's NBD daemon is killed while Q reads, Q's reads go on from B (over
  libiscsi), A's virtman starts the daemon again; Q reads A's LIO relay once over libiscsi;
- volume-img2 on Q, B, then A: A's open-iscsi + dm-multipath read Q's tgtd relay (Q also
  offers NBD, which dm nodes do not use).

B (dm, ``dm_relay = tgt``) is the standby parent of both children.

Every packet stays on the run's bridge inside the namespace guestkit creates. A missing
QEMU fails these tests, it never skips them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guestkit import Node, RunResult
from tests.functional.guestruns import (
    NOTHING_LEFT,
    TEST_TIMEOUT_S,
    assert_every_guest_passed,
    module_fixtures,
)

SIZE_MIB = 16
WORK_DIR = Path(__file__).resolve().parents[2] / ".work" / "mixed-guests"  # the last run's logs
NODES = [Node("S", 640, 1), Node("A", 768, 2), Node("B", 768, 3), Node("Q", 768, 4)]
A, B, Q = "10.77.0.2:3260", "10.77.0.3:3260", "10.77.0.4:3260"
A_NBD = "nbd://10.77.0.2:10809"
SERVER = "10.77.0.1:3260"
A_INITIATOR = "iqn.2026-12.org.vmthunder.guestkit:a"  # open-iscsi's, set by guestkit
Q_INITIATOR = "iqn.2010-10.org.vmthunder:10.77.0.4"  # the qemu driver's, for libiscsi
PRIVATE = {"sha_ok": True, "readback": True, "disk_differs": True, "origin": True}
Report = dict[str, dict[str, Any]]


run, report = module_fixtures(
    __name__, NODES, "mixedguest.py", work_dir=WORK_DIR, size_mib=SIZE_MIB
)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_every_guest_passes(run: RunResult, report: Report) -> None:
    assert_every_guest_passed(run, report)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_qemu_node_reads_through_a_dm_nodes_nbd_relay(report: Report) -> None:
    q = report["Q"]["img1"]
    assert q["paths"] == [A_NBD, B]  # A's relay first (NBD: A offers it), B standby
    assert {k: q[k] for k in PRIVATE} == PRIVATE
    assert report["Q"]["create"]["vm-q1"] == "0:/run/vmt-state/instances/vm-q1.qcow2"
    assert report["A"]["img1"]["lio_sessions"] == []  # Q reads A over NBD only
    assert q["lio_read"] is True  # and A's LIO relay serves libiscsi (CHAP) too


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_qemu_child_reads_on_when_the_dm_parents_nbd_relay_dies(report: Report) -> None:
    failover = report["Q"]["img1"]["failover"]
    assert failover["errors"] == [] and failover["sha_ok"] is True, failover
    assert failover["max_stall_s"] < 20, failover  # nbd_reconnect_delay (1 s) + TCG
    nbd = report["A"]["nbd_relay"]
    assert nbd["clients_before"] >= 1, nbd  # Q was reading over NBD
    assert nbd["new_pid"] not in (None, nbd["killed_pid"]), nbd  # virtman started it again
    assert nbd["sha_ok"] is True, nbd  # with the export back


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_dm_node_reads_through_a_qemu_nodes_tgt_relay(report: Report) -> None:
    a = report["A"]["img2"]
    assert a["paths"] == [Q, B]  # Q's relay first, B standby
    assert {k: a[k] for k in PRIVATE} == PRIVATE
    assert report["A"]["create"]["vm-a2"] == "0:/dev/mapper/snapshot_vm-a2"
    # open-iscsi's session on Q's tgtd, under A's initiator name, from A's address
    assert report["Q"]["tgt_connections"] == {
        "volume-img1": [],
        "volume-img2": [[A_INITIATOR, "10.77.0.2"]],
    }


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_dm_tgt_relay_serves_both_drivers_as_standby(report: Report) -> None:
    assert report["B"]["tgt_connections"] == {
        "volume-img1": [[Q_INITIATOR, "10.77.0.4"]],
        "volume-img2": [[A_INITIATOR, "10.77.0.2"]],
    }
    assert report["A"]["img2"]["standby"] == [B, True]  # the image's bytes, read from B


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_first_nodes_read_the_image_server(report: Report) -> None:
    assert report["A"]["img1"]["paths"] == [SERVER]
    assert report["B"]["img1"]["paths"] == report["B"]["img2"]["paths"] == [SERVER]
    assert report["Q"]["img2"]["paths"] == [SERVER]
    for name, image in (("A", "img1"), ("B", "img1"), ("B", "img2"), ("Q", "img2")):
        r = report[name][image]
        assert {k: r[k] for k in PRIVATE} == PRIVATE, (name, image)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_teardown_leaves_nothing_on_either_driver(report: Report) -> None:
    assert report["Q"]["destroy_child"] == report["A"]["destroy_child"] == "0:"
    for name in "ABQ":
        assert report[name]["stop_rc"] == 0
        assert set(report[name]["destroy"]) <= {"0:"}
    for name in "AB":
        assert report[name]["left"] == {**NOTHING_LEFT, "daemons": []}, name
    assert report["Q"]["left"] == {"daemons": [], "fuse_mounts": [], "files": []}
