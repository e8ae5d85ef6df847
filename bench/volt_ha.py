#!/usr/bin/env python3
"""Failover benchmark of volt-api on a shared PostgreSQL store (docs/ha.rst).

Starts ``--masters`` volt-api processes on 127.0.0.1 sharing one PostgreSQL database (the
``--database`` URL, which should hold no tree, or a private server started by this script
with the PostgreSQL binaries tools/setup.sh installs, as root), then ``--rounds`` times:

1. finds the master that runs the evictor (its log says so),
2. ``kill -9``s it while ``--clients`` client threads keep querying and heartbeating through
   the endpoint list (voltclient's failover),
3. measures the **takeover**: from the kill to the moment another master logs that it is
   the evictor, and the longest request the clients saw around the kill,
4. starts the killed master again.

Prints one line per round and, last::

    volt_ha: takeover min <A> s median <B> s max <C> s; client requests <N>, failed <F>

Exits non-zero if a client request failed or a takeover took longer than ``--bound``.
Traffic never leaves 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.volt_load import TOKEN, VoltServer  # noqa: E402
from brick.net import wait_port_free  # noqa: E402
from brick.wait import wait_until  # noqa: E402
from voltclient import Client  # noqa: E402
from voltclient.exceptions import VoltClientError  # noqa: E402

EVICTOR_LINE = "is now the evictor"


def evictor_of(servers: list[VoltServer], since: dict[int, int]) -> int | None:
    """The index of the master that logged taking the evictor after ``since`` (log sizes)."""
    for i, server in enumerate(servers):
        if server.proc is None or server.proc.poll() is not None:
            continue
        text = server.log_path.read_bytes()[since.get(i, 0) :]
        if EVICTOR_LINE.encode() in text:
            return i
    return None


def wait_evictor(servers: list[VoltServer], since: dict[int, int], timeout: float) -> int:
    def found() -> list[int]:  # a list: master 0 is a find too
        index = evictor_of(servers, since)
        return [] if index is None else [index]

    return wait_until(
        found, timeout_s=timeout, what="a master to take the evictor", max_interval_s=0.01
    )[0]


class Clients:
    """Threads that query and heartbeat through every master's URL until stopped."""

    def __init__(self, urls: list[str], count: int) -> None:
        self.urls = urls
        self.count = count
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0
        self.failed: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (start, duration)
        self.threads = [threading.Thread(target=self.run, args=(k,)) for k in range(count)]

    def run(self, k: int) -> None:
        start = k % len(self.urls)
        endpoints = ",".join(self.urls[start:] + self.urls[:start])
        host = f"10.9.{k // 200}.{1 + k % 200}"
        with Client(endpoints, token=TOKEN, timeout=10) as client:
            while not self.stop_event.is_set():
                began = time.monotonic()
                try:
                    client.volumes.get("volume-ha-bench", host=host)
                    client.members.heartbeat(host)
                except VoltClientError as exc:
                    with self.lock:
                        self.failed.append(str(exc))
                with self.lock:
                    self.requests += 2
                    self.latencies.append((began, time.monotonic() - began))
                self.stop_event.wait(0.05)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join()

    def longest_since(self, moment: float) -> float:
        with self.lock:
            return max((d for s, d in self.latencies if s + d >= moment), default=0.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="volt_ha.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--database", metavar="URL", help="PostgreSQL SQLAlchemy URL")
    parser.add_argument("--masters", type=int, default=3, help="volt-api processes (>= 2)")
    parser.add_argument("--rounds", type=int, default=5, help="kill -9 rounds")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--verbose", action="store_true", help="log the clients' failovers")
    parser.add_argument("--bound", type=float, default=3.0, help="seconds a takeover may take")
    args = parser.parse_args(argv)
    if args.masters < 2 or args.rounds < 1 or args.clients < 1:
        parser.error("--masters must be at least 2, --rounds and --clients at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The clients' failover warnings would drown the rounds (add --verbose if needed).
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR)
    cluster = None
    database = args.database
    if database is None:
        from tests.functional.pgserver import PostgresCluster

        cluster = PostgresCluster().start()
        database = cluster.url
    workdir = Path(tempfile.mkdtemp(prefix="volt-ha-"))
    servers: list[VoltServer] = []
    clients: Clients | None = None
    takeovers: list[float] = []
    try:
        for i in range(args.masters):
            (workdir / f"m{i}").mkdir()
            servers.append(
                VoltServer(workdir / f"m{i}", executor="balanced", api_threads=4, database=database)
            )
            servers[-1].start()
        print(f"{args.masters} volt-api on {database.split('@')[-1]}")
        clients = Clients([f"http://127.0.0.1:{s.port}" for s in servers], args.clients)
        clients.start()
        leader = wait_evictor(servers, {}, 10.0)
        for round_ in range(1, args.rounds + 1):
            time.sleep(1.0)  # clients settle on their endpoints
            since = {i: s.log_path.stat().st_size for i, s in enumerate(servers)}
            victim = servers[leader]
            assert victim.proc is not None
            killed = time.monotonic()
            victim.proc.kill()  # SIGKILL to the PID of the volt-api we started
            victim.proc.wait()
            new = wait_evictor(servers, since, 30.0)
            takeover = time.monotonic() - killed
            takeovers.append(takeover)
            time.sleep(0.5)
            print(
                f"round {round_}: killed master {leader}, master {new} took the evictor in "
                f"{takeover:.3f} s; longest client request since the kill "
                f"{clients.longest_since(killed):.3f} s"
            )
            wait_port_free(victim.port)  # its worker dies with it and closes the socket
            victim.start()  # the same port and database: back as a standby
            leader = new
    finally:
        if clients is not None:
            clients.stop()
        for server in servers:
            server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert clients is not None
    for sample in clients.failed[:5]:
        print(f"FAILED: {sample}")
    print(
        f"volt_ha: takeover min {min(takeovers):.3f} s median "
        f"{statistics.median(takeovers):.3f} s max {max(takeovers):.3f} s; client requests "
        f"{clients.requests}, failed {len(clients.failed)}"
    )
    return 1 if clients.failed or max(takeovers) > args.bound else 0


if __name__ == "__main__":
    sys.exit(main())
