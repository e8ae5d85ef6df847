"""Virtman when things die: a parent killed under a reading VM, virtman killed with -9."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from brick.executor import execute
from brick.netns import kill_netns_processes
from tests.functional.clusterfixtures import (
    IMAGE,
    create_vm,
    disk_matches,
    export_image,
)
from tests.functional.vmfixtures import (
    guest_image,
    libvirt_daemons,
    unique_instance,
    vm_factory,
    wait_for_marker,
)

__all__ = ["guest_image", "libvirt_daemons", "vm_factory"]  # fixtures used here

pytestmark = pytest.mark.functional


def _node_of(cluster, peer_id: str) -> str:
    host = peer_id.rpartition(":")[0]
    return next(n for n in cluster.node_names if cluster.hosts[n].address == host)


def _cache_bytes(cluster, node: str) -> int:
    cache = cluster.node_dir(node) / "state" / "cache" / f"{IMAGE}.qcow2"
    return cache.stat().st_blocks * 512 if cache.exists() else 0


def test_killing_the_parent_of_a_reading_node_loses_no_read(cluster_factory) -> None:
    cluster = cluster_factory(3, node_timeout=6, heartbeat_interval=1)
    image_file = export_image(cluster, 96)
    for node in cluster.node_names:  # one at a time: the third node's parents are ready
        create_vm(cluster, node, f"vm-{node}")
    tree = cluster.volt_tree(IMAGE)
    child = next(n for n in tree if n["depth"] == 2)
    leaf = _node_of(cluster, child["peer_id"])
    first, standby = (_node_of(cluster, p) for p in child["parents"])
    cluster.wait_for(
        lambda: [p["peer_id"] for p in cluster.paths(leaf, IMAGE)] == child["parents"],
        f"{leaf} to read from {child['parents']}",
    )
    # Slow the first parent's link so that the leaf's read is still running when it dies.
    cluster.lab.shape(cluster.hosts[first], 80)

    outcome: dict[str, object] = {}

    def read_the_whole_disk() -> None:
        try:
            outcome["same"] = disk_matches(
                str(cluster.node_dir(leaf) / "state" / "instances" / f"vm-{leaf}.qcow2"),
                image_file,
            )
        except Exception as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read_the_whole_disk)
    reader.start()
    cluster.wait_for(
        lambda: _cache_bytes(cluster, leaf) > 16 << 20, f"{leaf} to be reading from {first}"
    )
    # The parent host dies: virtman, its qemu-storage-daemon and tgtd, all at once.
    cluster.daemons.pop(first).kill9()
    killed = kill_netns_processes(cluster.hosts[first].netns)
    assert killed, f"{first} had no block-stack processes to kill"
    reader.join(timeout=240)
    assert not reader.is_alive(), "the read hung after the parent died"
    assert outcome == {"same": True}, outcome
    assert _cache_bytes(cluster, leaf) >= 96 << 20

    # Volt evicts the dead parent and re-parents the leaf, which follows.
    dead = f"{cluster.hosts[first].address}:{IMAGE}"

    def reparented() -> bool:
        # (with 2 nodes left the leaf takes the dead one's place at the top: parents [])
        entry = next(n for n in cluster.volt_tree(IMAGE) if n["peer_id"] == child["peer_id"])
        return dead not in entry["parents"]

    cluster.wait_for(reparented, "Volt to re-parent the leaf", timeout_s=30)
    cluster.wait_for(
        lambda: dead not in [p["peer_id"] for p in cluster.paths(leaf, IMAGE)],
        f"{leaf} to drop the dead parent's path",
        timeout_s=15,
    )
    assert dead not in [n["peer_id"] for n in cluster.volt_tree(IMAGE)]
    assert cluster.rpc(standby, "list") == [f"vm-{standby}:{IMAGE}"]


def test_kill_9_of_virtman_under_a_running_vm_then_restart_adopts_everything(
    cluster_factory, vm_factory
) -> None:
    cluster = cluster_factory(2, heartbeat_interval=1)
    image_file = cluster.workdir / "guest.raw"
    shutil.copyfile(vm_factory.guest.rootfs, image_file)
    assert cluster.rpc("img", "create_image_target", "image1", str(image_file)).startswith("0:")
    disks = [create_vm(cluster, "n1", vm) for vm in ("vm1", "vm2")]
    create_vm(cluster, "n2", "vm3")
    # A real VM runs on vm1's disk (and stays up) while virtman dies.
    console = cluster.workdir / "vm1.console"
    instance = unique_instance("vm1")
    vm_factory.boot(instance, Path(disks[0]), console, cmdline_extra="vmt.stay")
    assert vm_factory.guest.marker_matches(wait_for_marker(vm_factory.vms, instance, console))
    before = cluster.rpc("n1", "list")
    run = cluster.node_dir("n1") / "run"
    qsd_pid = int((run / "virtman-qsd.pid").read_text())
    tree_before = cluster.volt_tree(IMAGE)

    cluster.daemons.pop("n1").kill9()
    cluster.start_virtman("n1")

    assert cluster.rpc("n1", "list") == before
    assert int((run / "virtman-qsd.pid").read_text()) == qsd_pid, "the daemon was not adopted"
    assert cluster.volt_tree(IMAGE) == tree_before
    assert vm_factory.vms.info(instance).active
    for disk in disks[1:]:
        assert disk_matches(disk, image_file)
    log = (cluster.node_dir("n1") / "virtman.log").read_text()
    assert "reconciled: 1 image(s), 2 instance(s) adopted" in log

    # A create and a destroy after the restart work as before.
    disks.append(create_vm(cluster, "n1", "vm4"))
    vm_factory.vms.destroy(instance)
    for vm in ("vm1", "vm2", "vm4"):
        assert cluster.rpc("n1", "destroy", vm) == "0:"
    assert cluster.rpc("n1", "list") == []
    cluster.wait_for(
        lambda: not list((cluster.node_dir("n1") / "state" / "cache").iterdir()),
        "n1 to tear its stack down",
    )
    assert cluster.daemons.pop("n1").stop() == 0
    assert cluster.processes("n1") == [], "n1 left processes behind"
    mounts = execute(["cat", "/proc/mounts"]).stdout
    assert str(cluster.node_dir("n1")) not in mounts
    assert not list((cluster.node_dir("n1") / "state" / "instances").iterdir())
    assert not list((run / "exports").iterdir())
