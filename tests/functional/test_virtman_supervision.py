"""A node's own daemons SIGKILLed under a running virtmanserver: it notices within
``daemon_check_interval``, starts them again and rebuilds what lived in them (image stacks,
relays, image targets), while the children keep reading without an error.

The children's parent watch is on (``parent_check_interval`` 0.5 s): a child whose parent's
daemon died reports it, Volt finds the parent's data port refused but its virtmanserver
alive (the ``api_port`` of its heartbeats), and leaves the tree alone while the node
repairs itself (docs/bus.rst, "Detecting a dead parent")."""

from __future__ import annotations

import threading

import pytest

from brick.tgt import TgtAdm
from tests.functional.clusterfixtures import IMAGE, create_vm, disk_matches, export_image

pytestmark = pytest.mark.functional


def _node_of(cluster, peer_id: str) -> str:
    host = peer_id.rpartition(":")[0]
    return next(n for n in cluster.node_names if cluster.hosts[n].address == host)


def _log(cluster, node: str) -> str:
    return (cluster.node_dir(node) / "virtman.log").read_text(errors="replace")


def _volt_log(cluster) -> str:
    return (cluster.workdir / "volt" / "volt-api.log").read_text(errors="replace")


def _restarted(cluster, host: str, component: str, old: int) -> bool:
    return cluster.component_pid(host, component) not in (None, old)


def test_a_killed_storage_daemon_is_restarted_and_its_stack_rebuilt(cluster_factory) -> None:
    cluster = cluster_factory(3, heartbeat_interval=1)
    image_file = export_image(cluster, 64)
    disks = {node: create_vm(cluster, node, f"vm-{node}") for node in cluster.node_names}
    tree = cluster.volt_tree(IMAGE)
    child = next(n for n in tree if n["depth"] == 2)
    leaf, parent = _node_of(cluster, child["peer_id"]), _node_of(cluster, child["parents"][0])
    cluster.wait_for(
        lambda: [p["peer_id"] for p in cluster.paths(leaf, IMAGE)] == child["parents"],
        f"{leaf} to read from {child['parents']}",
    )
    cluster.lab.shape(cluster.hosts[parent], 80)  # the leaf's read outlives the kill
    outcome: dict[str, object] = {}

    def read_the_leaf_disk() -> None:
        try:
            outcome["same"] = disk_matches(disks[leaf], image_file)
        except Exception as exc:
            outcome["error"] = exc

    reader = threading.Thread(target=read_the_leaf_disk)
    reader.start()
    old = cluster.kill_component(parent, "qsd")
    cluster.wait_for(
        lambda: (
            _restarted(cluster, parent, "qsd", old)
            and "stack rebuilt after its daemon died" in _log(cluster, parent)
        ),
        f"{parent}'s virtmanserver to restart its qemu-storage-daemon",
        timeout_s=30,
    )
    # the leaf reported its parent, Volt found the data port refused but the parent's
    # virtmanserver alive: repairing, not evicted; after the grace its data port is back
    address = cluster.hosts[parent].address
    cluster.wait_for(
        lambda: f"repaired: {address}:" in _volt_log(cluster),
        f"Volt to find {parent} repaired",
        timeout_s=60,
    )
    assert f"parent {child['parents'][0]} stopped serving this node" in _log(cluster, leaf)
    volt_log = _volt_log(cluster)
    assert f"node daemon accepts on {address}:7774: repairing, not evicted" in volt_log
    assert f"evicting host {address}" not in volt_log
    reader.join(timeout=240)
    assert not reader.is_alive(), "the child's read hung"
    assert outcome == {"same": True}, outcome
    log = _log(cluster, parent)
    assert "qemu-storage-daemon virtman-qsd died: starting it again" in log
    # the parent serves again as before: same tree, its VM listed healthy, the origin back
    assert cluster.volt_tree(IMAGE) == tree
    assert [p["peer_id"] for p in cluster.paths(leaf, IMAGE)] == child["parents"]
    assert f"evicting host {address}" not in _volt_log(cluster)
    assert cluster.rpc(parent, "list") == [f"vm-{parent}:{IMAGE}"]
    fresh = create_vm(cluster, parent, "vm-after")
    assert disk_matches(fresh, image_file)
    assert disk_matches(disks[parent], image_file)  # a VM restarted on its old disk


def test_killed_tgtds_come_back_with_their_targets(cluster_factory) -> None:
    cluster = cluster_factory(1, heartbeat_interval=1)
    image_file = export_image(cluster, 16)
    node = cluster.node_names[0]
    create_vm(cluster, node, "vm-a")
    exported = cluster.rpc("img", "list_image_target")
    tgt = {h: TgtAdm(cluster.tgt_control_base + i) for i, h in enumerate(["img", node])}
    before = {h: sorted((t.iqn, t.accounts) for t in adm.targets()) for h, adm in tgt.items()}
    assert all(accounts for targets in before.values() for _, accounts in targets)  # CHAP
    old = {h: cluster.kill_component(h, "tgtd") for h in tgt}

    def back() -> bool:
        return (
            all(_restarted(cluster, h, "tgtd", old[h]) for h in tgt)
            and {h: sorted((t.iqn, t.accounts) for t in adm.targets()) for h, adm in tgt.items()}
            == before
        )

    cluster.wait_for(back, "both tgtds to be back with their targets", timeout_s=30)
    assert list(cluster.rpc("img", "list_image_target")) == list(exported)
    assert "image target of" not in _log(cluster, "img")  # no export failed
    assert "relay exported again after tgtd died" in _log(cluster, node)
    # the node's next reads of blocks it has not cached come from the image server again
    assert disk_matches(create_vm(cluster, node, "vm-b"), image_file)
