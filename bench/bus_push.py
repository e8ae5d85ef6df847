"""How fast a dead parent's removal reaches its child over the control bus (docs/bus.rst).

One ``LocalCluster`` (``vmt-demo/cluster.py``, qemu driver) with ``bus=True``: a private
RabbitMQ on the volt host, ``--nodes`` compute nodes, one random image, one VM per node
(created one at a time: two nodes at depth 1, the rest below). Each round: a depth >= 2
node's first parent gets ``kill -9`` on its virtmanserver, is removed from Volt (the
operator's DELETE, as an eviction does), and the child's paths file is polled until the
dead parent is gone; then the killed virtmanserver is started again (it adopts its stack
and joins the tree again) and the tree is waited for. With ``--no-bus`` the broker is
stopped first: the heartbeat does it. Last line::

    bus_push: <K> kills, bus <on|off>: from the DELETE's start min/median/p90/max
    <a>/<b>/<c>/<d> s; after its answer <...> s

Exit status 0 if every child dropped its dead parent (and, with the bus, within 2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmt-demo"))

from cluster import LocalCluster

from brick.netns import Lab
from brick.wait import wait_until

IMAGE = "volume-image1"
DELETE = (
    "import sys\n"
    "from voltclient import Client\n"
    "url, token, image, peer = sys.argv[1:5]\n"
    "Client(url, token=token).volumes.logout(image, peer)\n"
)
LAB_STATE = Path("/run/vmt-bench-labs")


def node_of(cluster: LocalCluster, peer_id: str) -> str:
    host = peer_id.rpartition(":")[0]
    return next(n for n in cluster.node_names if cluster.hosts[n].address == host)


def one_kill(cluster: LocalCluster) -> tuple[float, float]:
    tree = cluster.volt_tree(IMAGE)
    child = next(n for n in tree if n["depth"] >= 2 and n["parents"])
    leaf, dead_peer = node_of(cluster, child["peer_id"]), child["parents"][0]
    dead = node_of(cluster, dead_peer)

    def ids() -> list[str]:
        return [p["peer_id"] for p in cluster.paths(leaf, IMAGE)]

    wait_until(lambda: dead_peer in ids(), timeout_s=60, what=f"{leaf} to read from {dead}")
    cluster.kill_component(dead, "virtmanserver")
    url = f"http://{cluster.hosts['volt'].address}:7447"
    started = time.monotonic()
    cluster.hosts["ctl"].run(
        [sys.executable, "-c", DELETE, url, cluster.token, IMAGE, dead_peer], timeout_s=60
    )
    answered = time.monotonic()
    wait_until(
        lambda: dead_peer not in ids(),
        timeout_s=120,
        what=f"{leaf} to drop {dead}",
        interval_s=0.01,
        max_interval_s=0.02,
    )
    done = time.monotonic()
    cluster.start_virtman(dead)  # adopts its stack, joins the tree again
    wait_until(
        lambda: (
            (t := cluster.volt_tree(IMAGE))
            and len(t) == cluster.node_count
            and all(n.get("status") == "OK" for n in t)
        ),
        timeout_s=120,
        what=f"{dead} back in the tree",
        interval_s=0.5,
    )
    return done - started, done - answered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--heartbeat", type=int, default=8, help="heartbeat_interval (s)")
    parser.add_argument("--no-bus", action="store_true", help="stop the broker first")
    parser.add_argument("--lab", default=os.environ.get("VMT_TEST_LAB", "vmtq"))
    parser.add_argument(
        "--tgt-base", type=int, default=int(os.environ.get("VMT_TEST_TGT_BASE", "3700"))
    )
    parser.add_argument("--subnet", default="10.233.0.0/24")
    args = parser.parse_args()

    Lab.cleanup(args.lab, LAB_STATE)
    with tempfile.TemporaryDirectory(prefix="bus-push-") as tmp:
        work = Path(tmp)
        cluster = LocalCluster(
            work / "cluster",
            args.nodes,
            name=args.lab,
            subnet=args.subnet,
            tgt_control_base=args.tgt_base,
            lab_state_dir=LAB_STATE,
            heartbeat_interval=args.heartbeat,
            node_timeout=300,
            bus=True,
        )
        try:
            cluster.start()
            image = work / "image1.raw"
            image.write_bytes(os.urandom(16 << 20))
            assert cluster.rpc("img", "create_image_target", "image1", str(image)).startswith("0:")
            for node in cluster.node_names:
                result = cluster.rpc(
                    node, "create", f"vm-{node}", "image1", cluster.connection(IMAGE)
                )
                assert result.startswith("0:"), result
            if args.no_bus:
                assert cluster.rabbitmq is not None
                cluster.rabbitmq.stop()
            totals, afters = [], []
            for i in range(args.kills):
                total, after = one_kill(cluster)
                totals.append(total)
                afters.append(after)
                print(
                    json.dumps(
                        {"kill": i + 1, "s": round(total, 3), "after_answer_s": round(after, 3)}
                    ),
                    flush=True,
                )
        finally:
            cluster.close()

    def summary(values: list[float]) -> str:
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        return "/".join(
            f"{v:.2f}" for v in (ordered[0], statistics.median(ordered), p90, ordered[-1])
        )

    print(
        f"bus_push: {len(totals)} kills, bus {'off' if args.no_bus else 'on'}: from the "
        f"DELETE's start min/median/p90/max {summary(totals)} s; after its answer "
        f"{summary(afters)} s"
    )
    return 0 if args.no_bus or max(totals) < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
