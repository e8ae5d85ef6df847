"""The control bus with a real RabbitMQ (inside the lab's volt namespace): Volt pushes a dead
parent's removal to its child at once; with the broker stopped, heartbeats still do it.

Run with your own lab names: VMT_TEST_LAB=<lab> VMT_TEST_TGT_BASE=<port>.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from brick import rabbitmq
from brick.wait import wait_until
from tests.functional.clusterfixtures import IMAGE, create_vm, disk_matches, export_image

pytestmark = pytest.mark.functional

HEARTBEAT_S = 8  # far apart, so that a push and a heartbeat are told apart
DELETE_SNIPPET = (
    "import sys\n"
    "from voltclient import Client\n"
    "url, token, image, peer = sys.argv[1:5]\n"
    "Client(url, token=token).volumes.logout(image, peer)\n"
)


def _node_of(cluster, peer_id: str) -> str:
    host = peer_id.rpartition(":")[0]
    return next(n for n in cluster.node_names if cluster.hosts[n].address == host)


def _pushes(cluster, node: str) -> int:
    """How many pushes the node has applied so far (its log)."""
    log = cluster.node_dir(node) / "virtman.log"
    return log.read_text(errors="replace").count("Volt pushed new parents") if log.exists() else 0


def _remove_dead_parent(cluster) -> tuple[str, str, float, float, bool]:
    """Kill -9 the virtmanserver of a depth-1 node that is the first parent of a depth-2
    node, remove it from Volt (the operator's DELETE, as an eviction does), and measure how
    long the child takes to drop it from its paths. Returns (child, dead parent, seconds
    from the DELETE's start, seconds from its answer, whether the child got a push)."""
    tree = cluster.volt_tree(IMAGE)
    child = next(n for n in tree if n["depth"] == 2 and n["parents"])
    leaf = _node_of(cluster, child["peer_id"])
    dead_peer = child["parents"][0]
    dead = _node_of(cluster, dead_peer)
    cluster.wait_for(
        lambda: dead_peer in [p["peer_id"] for p in cluster.paths(leaf, IMAGE)],
        f"{leaf} to read from {dead_peer}",
    )
    cluster.kill_component(dead, "virtmanserver")
    pushes = _pushes(cluster, leaf)
    url = f"http://{cluster.hosts['volt'].address}:7447"
    started = time.monotonic()
    cluster.hosts["ctl"].run(
        [sys.executable, "-c", DELETE_SNIPPET, url, cluster.token, IMAGE, dead_peer],
        timeout_s=60,
    )
    answered = time.monotonic()
    wait_until(
        lambda: dead_peer not in [p["peer_id"] for p in cluster.paths(leaf, IMAGE)],
        timeout_s=60,
        what=f"{leaf} to drop {dead_peer}",
        interval_s=0.01,
        max_interval_s=0.02,
    )
    done = time.monotonic()
    return leaf, dead, done - started, done - answered, _pushes(cluster, leaf) > pushes


def test_push_reparents_in_seconds_and_heartbeats_take_over_when_the_bus_is_down(
    cluster_factory,
) -> None:
    assert rabbitmq.available(), "rabbitmq-server is not installed (tools/setup.sh installs it)"
    cluster = cluster_factory(6, bus=True, node_timeout=120, heartbeat_interval=HEARTBEAT_S)
    broker = cluster.rabbitmq
    assert broker is not None and broker.alive()
    image_file = export_image(cluster, 16)
    disks = {}
    for node in cluster.node_names:  # one at a time: depth 1 twice, then depth 2
        disks[node] = create_vm(cluster, node, f"vm-{node}")
    volt_log = cluster.daemons["volt"].log
    cluster.wait_for(
        lambda: "vmthunder.stack.built" in volt_log.read_text(errors="replace"),
        "Volt to hear a node's stack event over the bus",
    )

    # 1. Bus up: the child drops its dead parent as soon as Volt removes it.
    leaf, dead, bus_total, bus_after, pushed = _remove_dead_parent(cluster)
    assert pushed, f"{leaf} followed without a push"
    assert disk_matches(disks[leaf], image_file)  # every block, read through the new parents

    # 2. Bus down (broker stopped): the next heartbeat does it.
    broker.stop()
    assert not broker.alive()
    leaf2, dead2, beat_total, beat_after, pushed = _remove_dead_parent(cluster)
    assert not pushed  # its heartbeat did it
    assert disk_matches(disks[leaf2], image_file)

    # 3. Bus back: pushes work again (the nodes reconnect by themselves).
    alive = [n for n in cluster.node_names if n in cluster.daemons]
    logs = {n: cluster.node_dir(n) / "virtman.log" for n in alive}
    offsets = {n: logs[n].stat().st_size for n in alive}
    cluster.start_rabbitmq()
    for n in alive:
        cluster.wait_for(
            lambda n=n: "Reconnected to AMQP" in logs[n].read_text(errors="replace")[offsets[n] :],
            f"{n} to reconnect to the bus",
        )
    leaf3, dead3, again_total, _, pushed = _remove_dead_parent(cluster)
    assert pushed, f"{leaf3} followed without a push after the broker came back"
    assert disk_matches(disks[leaf3], image_file)
    print(
        json.dumps(
            {
                "bus_s": round(bus_total, 3),
                "bus_after_answer_s": round(bus_after, 3),
                "heartbeat_s": round(beat_total, 3),
                "heartbeat_after_answer_s": round(beat_after, 3),
                "heartbeat_interval_s": HEARTBEAT_S,
                "bus_again_s": round(again_total, 3),
                "killed": [dead, dead2, dead3],
                "children": [leaf, leaf2, leaf3],
            }
        )
    )
    assert bus_total < 2.0, f"push took {bus_total:.2f} s"
    assert again_total < 2.0, f"push after the broker's restart took {again_total:.2f} s"
    assert beat_total <= HEARTBEAT_S + 3.0
    text = "".join(
        (cluster.node_dir(n) / "virtman.log").read_text(errors="replace")
        for n in cluster.node_names
        if (cluster.node_dir(n) / "virtman.log").exists()
    )
    assert "Volt pushed new parents" in text
