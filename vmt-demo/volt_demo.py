#!/usr/bin/env python3
"""Volt demo: a burst of simulated compute nodes joins one image's tree, builds, fails, heals.

Starts a private volt-api on 127.0.0.1, then N simulated nodes (threads using voltclient) query
the same image at the same moment, "build their stack" for a random time and register their
relay, heartbeating every second. Two inner nodes then die silently: Volt evicts them and
re-parents their children, who learn their new parents on their next heartbeat. The tree is
printed at each stage with the ``volt`` CLI. Exit status 0 only if every check held.

The node addresses (127.77.x.y) are labels sent in the request bodies; all traffic goes to
volt-api on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from localvolt import LocalVolt

from brick.exception import Timeout
from brick.wait import pause, wait_until
from voltclient import shell

IMAGE = "volume-demo"
IQN = f"iqn.2010-10.org.openstack:{IMAGE}"


class SimulatedNode(threading.Thread):
    """Query, build for a while, register, then heartbeat until told to stop (or die)."""

    def __init__(self, volt: LocalVolt, index: int, start: threading.Barrier, build_s: float):
        super().__init__(daemon=True)
        self.client = volt.client()
        self.host = f"127.77.{index // 250}.{1 + index % 250}"
        self.start_barrier = start
        self.build_s = build_s
        self.alive = threading.Event()
        self.alive.set()
        self.first_answer: tuple[str | None, list] | None = None
        self.registered = threading.Event()
        self.parents: list[str] = []

    def run(self) -> None:
        self.start_barrier.wait()
        peer_id, parents = self.client.volumes.get(IMAGE, host=self.host)
        self.first_answer = (peer_id, parents)
        if peer_id is None:
            return
        pause(self.build_s)  # connect paths, cache, relay target: simulated
        self.client.volumes.login(IMAGE, peer_id, self.host, 3260, IQN, 1)
        self.registered.set()
        while not stopping.wait(1.0) and self.alive.is_set():
            for entry in self.client.members.heartbeat(host=self.host):
                self.parents = [p.peer_id for p in entry["parents"]]


stopping = threading.Event()


def show(volt: LocalVolt, title: str) -> None:
    print(f"\n== {title}")
    shell.main(["--endpoint", volt.url, "--token", volt.token, "volume-show", IMAGE])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=30, help="simulated compute nodes (30)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of build times")
    parser.add_argument("--workdir", type=Path, help="keep volt-api's config, log, store here")
    args = parser.parse_args()
    if args.nodes < 7:
        parser.error("--nodes must be at least 7 (the demo kills two inner nodes)")
    rnd = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="volt-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    volt = LocalVolt(workdir, node_timeout=3).start()
    failures: list[str] = []
    orphans: list[str] = []
    healed_s = depth = bound = 0.0
    try:
        print(f"volt-api on {volt.url} (log: {volt.log_file})")
        barrier = threading.Barrier(args.nodes)
        nodes = [SimulatedNode(volt, i, barrier, rnd.uniform(0.3, 2.0)) for i in range(args.nodes)]
        started = time.monotonic()
        for node in nodes:
            node.start()
        wait_until(
            lambda: all(n.first_answer is not None for n in nodes),
            timeout_s=30,
            what="every node's first answer",
        )
        placed = sum(1 for n in nodes if n.first_answer and n.first_answer[0] is not None)
        print(
            f"\n{placed} of {args.nodes} nodes placed on their first query "
            f"in {time.monotonic() - started:.2f} s"
        )
        if placed != args.nodes:
            failures.append(f"only {placed} nodes placed at once")
        show(volt, "the burst, right after the queries (pending = still building)")
        wait_until(
            lambda: all(n.registered.is_set() or not n.is_alive() for n in nodes),
            timeout_s=30,
            what="every node's registration",
        )
        show(volt, "every node built its stack and registered its relay")

        client = volt.client()
        tree = client.volumes.list(IMAGE)
        depth = max(n["depth"] for n in tree)
        bound = math.ceil(math.log2(len(tree))) + 1
        if depth > bound:
            failures.append(f"depth {depth} > bound {bound}")
        inner = [n for n in tree if n["depth"] == 2][:2]
        victims = {n["peer_id"] for n in inner}
        orphans = [n["peer_id"] for n in tree if n["parent"] in victims]
        for node in nodes:
            if f"{node.host}:{IMAGE}" in victims:
                node.alive.clear()  # stops heartbeating: a silent crash
        print(f"\n== {', '.join(sorted(victims))} crash (no more heartbeats)")
        crashed = time.monotonic()
        by_peer = {f"{n.host}:{IMAGE}": n for n in nodes}

        def healed() -> bool:
            current = {n["peer_id"] for n in client.volumes.list(IMAGE)}
            return not victims & current and all(
                not victims & set(by_peer[o].parents) and by_peer[o].parents for o in orphans
            )

        with contextlib.suppress(Timeout):  # checked (and reported) below
            wait_until(healed, timeout_s=15, what="the healed tree", interval_s=0.2, backoff=1.0)
        healed_s = time.monotonic() - crashed
        show(volt, f"healed {healed_s:.1f} s after the crash (node_timeout 3 s + heartbeat)")
        final = client.volumes.list(IMAGE)
        if victims & {n["peer_id"] for n in final}:
            failures.append("crashed nodes still in the tree")
        if any(victims & set(by_peer[o].parents) for o in orphans):
            failures.append("an orphan still reads from a crashed node")
        depth = max(n["depth"] for n in final)
        bound = math.ceil(math.log2(len(final))) + 1
        if depth > bound:
            failures.append(f"depth {depth} > bound {bound} after eviction")
    finally:
        stopping.set()
        code = volt.stop()
        if code != 0:
            failures.append(f"volt-api exited {code} on SIGTERM")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    verdict = "verified" if not failures else "FAILED"
    print(
        f"\nvolt_demo: {args.nodes} nodes placed at once, 2 crashed, "
        f"{len(orphans)} orphans re-parented in {healed_s:.1f} s; depth {depth} "
        f"(bound {bound}); {verdict}"
    )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
