"""Issue 12, the Capture acceptance (qemu driver, real daemons, no guest VM): node A's
instance of image I (served by the image server S) gets a marker written through its
snapshot; A captures the instance as image J; nodes B and C boot J through the tree with A
as its image server; both read the marker and S sends nothing for them; A's instance keeps
its own data; everything is destroyed and nothing is left.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from brick.tgt import TgtAdm
from tests.functional.clusterfixtures import (
    IMAGE,
    TGT_BASE,
    disk_matches,
    qemu_io,
    sha256,
    write_image,
)

pytestmark = pytest.mark.functional

SIZE_MIB = 32
CAPTURED = "volume-image2"
MARK = "-P 0x5a 5M 64k"  # the marker, written on A before the capture
LATER = "-P 0x33 7M 64k"  # written on A after the capture: not in the captured image


def _mounts_under(path: Path) -> list[str]:
    return [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(path))
    ]


def test_capture_then_boot_on_two_nodes_through_the_tree(cluster_factory) -> None:
    cluster = cluster_factory(3)
    a, b, c = cluster.node_names
    image_file = cluster.workdir / "image1.raw"
    digest = write_image(image_file, SIZE_MIB)
    assert cluster.rpc("img", "create_image_target", "image1", str(image_file)).startswith("0:")

    # A's instance of I, and the marker written through its snapshot.
    result = cluster.rpc(a, "create", "vm-a", "image1", cluster.connection(IMAGE))
    assert result.startswith("0:"), result
    disk_a = result[2:]
    qemu_io(disk_a, f"write {MARK}")

    # Capture (no guest runs on the disk here: it is quiesced by construction).
    sent_before_capture = cluster.tx_bytes("img")
    result = cluster.rpc(a, "capture", "vm-a", "image2")
    captured = cluster.workdir.parent / f"{CAPTURED}.raw"
    assert result == f"0:{captured}", result
    capture_sent = cluster.tx_bytes("img") - sent_before_capture
    assert captured.stat().st_size == SIZE_MIB << 20
    assert captured.stat().st_mode & 0o777 == 0o444
    assert disk_matches(disk_a, captured)  # base + A's writes, flattened
    assert CAPTURED in cluster.rpc(a, "list_image_target")
    # the same name again: a clear warning, nothing changed
    again = cluster.rpc(a, "capture", "vm-a", "image2")
    assert again.startswith("1:") and "image2" in again, again
    captured_digest = sha256(captured)

    # A keeps running on its own snapshot; a later write stays A's.
    qemu_io(disk_a, f"write {LATER}")

    # B and C boot J through the tree: A's target is J's image server, S is not involved.
    source = {
        "target_portal": f"{cluster.hosts[a].address}:3260",
        "target_iqn": f"iqn.2010-10.org.openstack:{CAPTURED}",
        "target_lun": 1,
    }
    sent_before = cluster.tx_bytes("img")
    disks = {}
    for node in (b, c):
        result = cluster.rpc(node, "create", f"vm-{node}", "image2", source)
        assert result.startswith("0:"), f"{node}: {result}"
        disks[node] = result[2:]
    for node, disk in disks.items():
        assert "read 65536/65536" in qemu_io(disk, f"read {MARK}", read_only=True), node
        assert disk_matches(disk, captured), f"{node}'s disk differs from the captured image"
    image_server_sent = cluster.tx_bytes("img") - sent_before
    tree = cluster.volt_tree(CAPTURED)
    assert sorted(n["host"] for n in tree) == sorted(cluster.hosts[n].address for n in (b, c))
    top = [n for n in tree if n["depth"] == 1]
    for entry in top:  # the top of J's tree reads from A's image target
        node = b if entry["host"] == cluster.hosts[b].address else c
        assert [p["portal"] for p in cluster.paths(node, CAPTURED)] == [source["target_portal"]]
    # A's tgtd shows them reading J (what image_delete of the z/VM API refuses on)
    j_iqn = source["target_iqn"]
    a_readers = {x.address for x in TgtAdm(TGT_BASE + 1).connections(j_iqn)}
    assert a_readers == {n["host"] for n in top}, (a_readers, tree)
    # S's target never saw B or C (tgtd's own table); its link carried only heartbeats
    s_readers = {
        x.address for x in TgtAdm(TGT_BASE).connections(f"iqn.2010-10.org.openstack:{IMAGE}")
    }
    assert not s_readers & {cluster.hosts[b].address, cluster.hosts[c].address}, s_readers
    assert image_server_sent < 256 << 10, image_server_sent  # heartbeats, no image data
    print(
        f"\ncapture-then-boot on 2 nodes: the image server sent {capture_sent} bytes during "
        f"the capture (A's cache filling; {SIZE_MIB} MiB image) and {image_server_sent} "
        "bytes while B and C booted and read the whole captured image"
    )

    # A's instance still reads its own data (the marker and its later write).
    assert "read 65536/65536" in qemu_io(disk_a, f"read {MARK}", read_only=True)
    assert "read 65536/65536" in qemu_io(disk_a, f"read {LATER}", read_only=True)
    with open(captured, "rb") as f:  # B and C read the captured image: not A's later write
        f.seek(7 << 20)
        assert f.read(65536) != b"\x33" * 65536

    # Destroy all: B and C, then J's target on A, then A's instance, then I on S.
    for node in (b, c):
        assert cluster.rpc(node, "destroy", f"vm-{node}") == "0:"
    cluster.wait_for(lambda: cluster.volt_tree(CAPTURED) == [], "Volt to forget J's nodes")
    assert cluster.rpc(a, "destroy_image_target", "image2") == "0:"
    assert cluster.rpc(a, "destroy", "vm-a") == "0:"
    cluster.wait_for(lambda: cluster.volt_tree(IMAGE) == [], "Volt to forget I's nodes")
    assert cluster.rpc("img", "destroy_image_target", "image1") == "0:"
    for i, node in enumerate(cluster.node_names):
        cluster.wait_for(
            lambda node=node: not list((cluster.node_dir(node) / "state" / "cache").iterdir()),
            f"{node} to remove its cache",
        )
        assert _mounts_under(cluster.node_dir(node)) == []
        assert TgtAdm(TGT_BASE + 1 + i).targets() == []
        assert list((cluster.node_dir(node) / "state" / "instances").iterdir()) == []
    assert cluster.rpc("img", "list_image_target") == {}
    for name in [*cluster.node_names, "img"]:
        assert cluster.daemons.pop(name).stop() == 0
        assert cluster.processes(name) == [], f"{name} left processes behind"
    # the images themselves are files: I unchanged, J as captured (the operator's to remove)
    assert sha256(image_file) == digest
    assert sha256(captured) == captured_digest
    assert [p.name for p in cluster.workdir.parent.glob(".*.part")] == []
    captured.unlink()
