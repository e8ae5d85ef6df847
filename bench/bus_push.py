"""How fast a dead parent's removal reaches its child (docs/bus.rst).

One ``LocalCluster`` (``vmt-demo/cluster.py``, qemu driver) with ``bus=True``: a private
RabbitMQ on the volt host, ``--nodes`` compute nodes, one random image, one VM per node
(created one at a time: two nodes at depth 1, the rest below). Each round picks a depth >= 2
node and its first parent, then (``--mode``):

* ``detect`` (the default): the child reads its image (blocks it has not read yet, O_DIRECT)
  while every daemon of the parent gets ``kill -9`` (virtmanserver, qemu-storage-daemon,
  tgtd: a dead machine), and nobody tells Volt: the child notices, reports, Volt confirms,
  evicts and pushes. Timed from the first kill until the child's paths file no longer names
  the parent; the reader's errors are counted.
* ``delete``: only the parent's virtmanserver is killed and the operator's DELETE removes it
  from Volt; timed from the DELETE's start and from its answer.

Then the killed node is started again (it adopts or rebuilds its stack and joins the tree
again) and the tree is waited for. With ``--no-bus`` the broker is stopped first: in
``detect`` mode the report goes over the REST API (and the child's heartbeats, every second
for a few seconds after it, bring the new parents); in ``delete`` mode the heartbeat does it.
Last line::

    bus_push: <K> kills, bus <on|off>, detect: from the kill min/median/p90/max
    <a>/<b>/<c>/<d> s; <E> read errors in <R> reads
    bus_push: <K> kills, bus <on|off>, delete: from the DELETE's start min/median/p90/max
    <a>/<b>/<c>/<d> s; after its answer <...> s

Exit status 0 if every child dropped its dead parent (and, with the bus, within 2 s; in
``detect`` mode with no read error).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmt-demo"))

from cluster import LocalCluster
from diskreader import DiskReader

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


def pick(cluster: LocalCluster) -> tuple[str, str, str, Callable[[], list[str]]]:
    """(child, its first parent's peer id, that parent's node, the child's path ids now)."""
    tree = cluster.volt_tree(IMAGE)
    child = next(n for n in tree if n["depth"] >= 2 and n["parents"])
    leaf, dead_peer = node_of(cluster, child["peer_id"]), child["parents"][0]
    dead = node_of(cluster, dead_peer)

    def ids() -> list[str]:
        return [p["peer_id"] for p in cluster.paths(leaf, IMAGE)]

    wait_until(lambda: dead_peer in ids(), timeout_s=60, what=f"{leaf} to read from {dead}")
    return leaf, dead_peer, dead, ids


def wait_dropped(ids: Callable[[], list[str]], dead_peer: str, leaf: str) -> float:
    wait_until(
        lambda: dead_peer not in ids(),
        timeout_s=120,
        what=f"{leaf} to drop {dead_peer}",
        interval_s=0.01,
        max_interval_s=0.02,
    )
    return time.monotonic()


def restart(cluster: LocalCluster, dead: str) -> None:
    """Start the killed node again (it adopts or rebuilds its stack, joins the tree again)."""
    cluster.start_virtman(dead)
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


def one_detection(cluster: LocalCluster, rng: random.Random) -> tuple[float, int, list[str]]:
    """(seconds from the first kill until the child's paths drop the parent, reads, errors)."""
    leaf, dead_peer, dead, ids = pick(cluster)
    export = cluster.node_dir(leaf) / "run" / "exports" / f"{IMAGE}.raw"
    start = rng.randrange(export.stat().st_size)
    with DiskReader(export, start=start, pace_s=0.02) as reader:
        wait_until(lambda: reader.reads >= 5, timeout_s=30, what=f"{leaf} to read")
        killed_at = time.monotonic()
        cluster.kill_node(dead)
        done = wait_dropped(ids, dead_peer, leaf)
        after = reader.reads
        wait_until(lambda: reader.reads >= after + 20, timeout_s=60, what=f"{leaf} to read on")
    restart(cluster, dead)
    return done - killed_at, reader.reads, reader.errors


def one_kill(cluster: LocalCluster) -> tuple[float, float]:
    leaf, dead_peer, dead, ids = pick(cluster)
    cluster.kill_component(dead, "virtmanserver")
    url = f"http://{cluster.hosts['volt'].address}:7447"
    started = time.monotonic()
    cluster.hosts["ctl"].run(
        [sys.executable, "-c", DELETE, url, cluster.token, IMAGE, dead_peer], timeout_s=60
    )
    answered = time.monotonic()
    done = wait_dropped(ids, dead_peer, leaf)
    restart(cluster, dead)
    return done - started, done - answered


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return "/".join(f"{v:.2f}" for v in (ordered[0], statistics.median(ordered), p90, ordered[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--heartbeat", type=int, default=8, help="heartbeat_interval (s)")
    parser.add_argument("--no-bus", action="store_true", help="stop the broker first")
    parser.add_argument("--mode", choices=("detect", "delete"), default="detect")
    parser.add_argument("--image-mib", type=int, default=128)
    parser.add_argument(
        "--nbd-reconnect-delay",
        type=int,
        default=1,
        help="the nodes' nbd_reconnect_delay (a read in flight to the dead parent waits it)",
    )
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
            extra_conf=f"nbd_reconnect_delay = {args.nbd_reconnect_delay}\n",
        )
        try:
            cluster.start()
            image = work / "image1.raw"
            with open(image, "wb") as f:
                for _ in range(args.image_mib):
                    f.write(os.urandom(1 << 20))
            assert cluster.rpc("img", "create_image_target", "image1", str(image)).startswith("0:")
            for node in cluster.node_names:
                result = cluster.rpc(
                    node, "create", f"vm-{node}", "image1", cluster.connection(IMAGE)
                )
                assert result.startswith("0:"), result
            if args.no_bus:
                assert cluster.rabbitmq is not None
                cluster.rabbitmq.stop()
            bus = "off" if args.no_bus else "on"
            if args.mode == "detect":
                return detect_rounds(cluster, args.kills, bus)
            return delete_rounds(cluster, args.kills, bus)
        finally:
            cluster.close()


def detect_rounds(cluster: LocalCluster, kills: int, bus: str) -> int:
    rng = random.Random(13)
    times: list[float] = []
    reads, errors = 0, []
    for i in range(kills):
        moved, n, errs = one_detection(cluster, rng)
        times.append(moved)
        reads += n
        errors += errs
        print(json.dumps({"kill": i + 1, "s": round(moved, 3), "read_errors": errs}), flush=True)
    print(
        f"bus_push: {len(times)} kills, bus {bus}, detect: from the kill min/median/p90/max "
        f"{summary(times)} s; {len(errors)} read errors in {reads} reads"
    )
    return 0 if not errors and (bus == "off" or max(times) <= 2.0) else 1


def delete_rounds(cluster: LocalCluster, kills: int, bus: str) -> int:
    totals, afters = [], []
    for i in range(kills):
        total, after = one_kill(cluster)
        totals.append(total)
        afters.append(after)
        print(
            json.dumps({"kill": i + 1, "s": round(total, 3), "after_answer_s": round(after, 3)}),
            flush=True,
        )
    print(
        f"bus_push: {len(totals)} kills, bus {bus}, delete: from the DELETE's start "
        f"min/median/p90/max {summary(totals)} s; after its answer {summary(afters)} s"
    )
    return 0 if bus == "off" or max(totals) < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
