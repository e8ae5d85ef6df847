"""The control bus with a real RabbitMQ (inside the lab's volt namespace): a parent node
that dies (every daemon of it killed with ``kill -9``, no operator) is noticed by its child,
confirmed and evicted by Volt, and the child's new parents are in place within 2 s while it
reads on without an error; with the broker stopped, the report goes over the REST API.

Run with your own lab names: VMT_TEST_LAB=<lab> VMT_TEST_TGT_BASE=<port>.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from brick import rabbitmq
from brick.wait import wait_until
from tests.functional.clusterfixtures import IMAGE, create_vm, disk_matches, export_image

sys.path.insert(0, str(Path(__file__).parents[2] / "vmt-demo"))

from diskreader import DiskReader

pytestmark = pytest.mark.functional

HEARTBEAT_S = 8  # far apart, so that a push and a heartbeat are told apart
IMAGE_MIB = 32
# A read in flight to the dead parent waits this long before the quorum moves it to the
# next path, and the dead path's removal waits for that read (docs/bus.rst).
NBD_RECONNECT_S = 1


def _node_of(cluster, peer_id: str) -> str:
    host = peer_id.rpartition(":")[0]
    return next(n for n in cluster.node_names if cluster.hosts[n].address == host)


def _log(cluster, node: str) -> str:
    log = cluster.node_dir(node) / "virtman.log"
    return log.read_text(errors="replace") if log.exists() else ""


def _kill_a_parent(cluster, phase: int) -> dict:
    """Kill every daemon of the first parent of a depth >= 2 node while that child reads
    its image (blocks it has not read before); measure how long the child takes to drop
    the dead parent from its paths, from the first kill, with no operator's action."""
    tree = cluster.volt_tree(IMAGE)
    child = next(n for n in tree if n["depth"] >= 2 and n["parents"])
    leaf = _node_of(cluster, child["peer_id"])
    dead_peer = child["parents"][0]
    dead = _node_of(cluster, dead_peer)

    def ids() -> list[str]:
        return [p["peer_id"] for p in cluster.paths(leaf, IMAGE)]

    cluster.wait_for(lambda: dead_peer in ids(), f"{leaf} to read from {dead_peer}")
    pushes = _log(cluster, leaf).count("Volt pushed new parents")
    export = cluster.node_dir(leaf) / "run" / "exports" / f"{IMAGE}.raw"
    with DiskReader(export, start=phase * (IMAGE_MIB << 20) // 3, pace_s=0.02) as reader:
        wait_until(lambda: reader.reads >= 5, timeout_s=30, what=f"{leaf} to read")
        killed_at = time.monotonic()
        cluster.kill_node(dead)
        wait_until(
            lambda: dead_peer not in ids(),
            timeout_s=60,
            what=f"{leaf} to drop {dead_peer}",
            interval_s=0.01,
            max_interval_s=0.02,
        )
        moved = time.monotonic() - killed_at
        after = reader.reads
        wait_until(lambda: reader.reads >= after + 20, timeout_s=60, what=f"{leaf} to read on")
    return {
        "child": leaf,
        "killed": dead,
        "moved_s": round(moved, 3),
        "reads": reader.reads,
        "read_errors": reader.errors,
        "pushed": _log(cluster, leaf).count("Volt pushed new parents") > pushes,
    }


def test_a_dead_parent_is_detected_and_replaced_in_seconds_without_an_operator(
    cluster_factory,
) -> None:
    assert rabbitmq.available(), "rabbitmq-server is not installed (tools/setup.sh installs it)"
    cluster = cluster_factory(
        6,
        bus=True,
        node_timeout=120,
        heartbeat_interval=HEARTBEAT_S,
        extra_conf=f"nbd_reconnect_delay = {NBD_RECONNECT_S}\n",
    )
    broker = cluster.rabbitmq
    assert broker is not None and broker.alive()
    image_file = export_image(cluster, IMAGE_MIB)
    disks = {}
    for node in cluster.node_names:  # one at a time: depth 1 twice, then depth 2
        disks[node] = create_vm(cluster, node, f"vm-{node}")
    volt_log = cluster.daemons["volt"].log
    cluster.wait_for(
        lambda: "vmthunder.stack.built" in volt_log.read_text(errors="replace"),
        "Volt to hear a node's stack event over the bus",
    )

    # 1. Bus up: the child reports over the bus, Volt confirms, evicts and pushes.
    bus = _kill_a_parent(cluster, 0)
    assert bus["pushed"], f"{bus['child']} followed without a push"
    assert bus["read_errors"] == []
    assert disk_matches(disks[bus["child"]], image_file)  # every block, through the new parents

    # 2. Bus down (broker stopped): the report goes over the REST API, the child's
    #    heartbeats (every second for a few seconds after it) bring the new parents.
    broker.stop()
    assert not broker.alive()
    rest = _kill_a_parent(cluster, 1)
    assert not rest["pushed"]
    assert rest["read_errors"] == []
    assert "reported parent" in _log(cluster, rest["child"])
    assert "(REST)" in _log(cluster, rest["child"])

    # 3. Bus back: reports and pushes go over it again (the nodes reconnect by themselves).
    alive = [n for n in cluster.node_names if n in cluster.daemons]
    logs = {n: cluster.node_dir(n) / "virtman.log" for n in alive}
    offsets = {n: logs[n].stat().st_size for n in alive}
    cluster.start_rabbitmq()
    for n in alive:
        cluster.wait_for(
            lambda n=n: "Reconnected to AMQP" in logs[n].read_text(errors="replace")[offsets[n] :],
            f"{n} to reconnect to the bus",
        )
    again = _kill_a_parent(cluster, 2)
    assert again["pushed"], f"{again['child']} followed without a push after the restart"
    assert again["read_errors"] == []
    assert disk_matches(disks[again["child"]], image_file)

    text = volt_log.read_text(errors="replace")
    print(json.dumps({"bus": bus, "rest": rest, "bus_again": again, "heartbeat_s": HEARTBEAT_S}))
    assert text.count("confirmed the death of") >= 3, "Volt did not log its confirmations"
    assert "stopped serving it (bus)" in text and "stopped serving it (api)" in text
    # every daemon of the parent died, its virtmanserver too: evicted at once, never taken
    # for a node repairing itself (its heartbeats announced the virtmanserver's port)
    assert "nor its node daemon's" in text and "repairing, not evicted" not in text
    assert bus["moved_s"] <= 2.0, f"new parents {bus['moved_s']:.2f} s after the kill"
    assert again["moved_s"] <= 2.0, f"after the broker's restart: {again['moved_s']:.2f} s"
    assert rest["moved_s"] <= 4.0, f"over REST: {rest['moved_s']:.2f} s"
