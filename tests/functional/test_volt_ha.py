"""Several volt-api processes on one real PostgreSQL (docs/ha.rst).

A 160-node burst spread across 3 masters, with random leaves and hosts that go silent (and
are evicted): every node gets a usable answer and the trees in the store pass the property
tests' invariants. Then the same with ``kill -9`` of the master that runs the evictor in the
middle of the burst: the nodes fail over (0 failed requests) and a survivor takes the
evictor over within ``TAKEOVER_BOUND`` seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg
import pytest
import sqlalchemy as sa

from brick.wait import pause, wait_until
from tests.functional.pgserver import PostgresCluster
from tests.functional.voltproc import VoltProcess
from tests.unit.volt.invariants import check_tree
from volt.service import VoltService
from volt.store import EvictorLease, Store
from volt.topology import load_executor
from voltclient import Client
from voltclient.exceptions import NotFound, VoltClientError

NODES = 160
IMAGES = ["volume-ha-a", "volume-ha-b", "volume-ha-c"]
NODE_TIMEOUT = 6  # seconds: silent hosts go quickly, live ones keep a margin under load
HEARTBEAT = 0.8  # seconds between two heartbeats of a live host
TAKEOVER_BOUND = 3.0  # seconds from kill -9 of the evictor's master to a new evictor
EVICTOR_LINE = "is now the evictor"
_databases = itertools.count()


@pytest.fixture
def database(postgres: PostgresCluster) -> str:
    """A fresh database of the session's PostgreSQL; returns its SQLAlchemy URL."""
    name = f"volt_ha_{next(_databases)}"
    dsn = f"host=127.0.0.1 port={postgres.port} user=volt dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def masters(volt_factory: Callable[..., VoltProcess], database: str) -> list[VoltProcess]:
    return [
        volt_factory(
            database__connection=database,
            database__liveness_write_interval=1,
            node_timeout=NODE_TIMEOUT,
        )
        for _ in range(3)
    ]


def host_of(i: int) -> str:
    return f"10.7.{i // 200}.{1 + i % 200}"


@dataclass
class Burst:
    masters: list[VoltProcess]
    rnd: random.Random = field(default_factory=lambda: random.Random(14))
    failures: list[str] = field(default_factory=list)
    live: dict[str, tuple[str, Client]] = field(default_factory=dict)  # host -> (peer, client)
    left: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    placed = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    clients: list[Client] = field(default_factory=list)

    def client(self, i: int) -> Client:
        """Node i's client: every master, starting with master i % 3 (the spread)."""
        urls = [m.url for m in self.masters]
        start = i % len(urls)
        client = Client(",".join(urls[start:] + urls[:start]), token="test-token", timeout=10)
        with self.lock:
            self.clients.append(client)
        return client

    def node(self, i: int) -> None:
        host, image = host_of(i), IMAGES[i % len(IMAGES)]
        client = self.client(i)
        fate = self.rnd.random()
        try:
            peer_id, parents = client.volumes.get(image, host=host)
            assert peer_id == f"{host}:{image}", peer_id
            ids = [p.peer_id for p in parents]
            assert len(ids) == len(set(ids)) and peer_id not in ids, ids
            assert all(p.peer_id and p.peer_id.endswith(":" + image) for p in parents), ids
            client.volumes.login(image, peer_id, host, 3260, f"iqn.2010-10.org.test:{i}", 1)
            with self.lock:
                self.placed += 1
            if fate < 0.2:
                # NotFound: answered by a master that died, then retried on another
                with contextlib.suppress(NotFound):
                    client.volumes.logout(image, peer_id)
                with self.lock:
                    self.left.add(peer_id)
            elif fate < 0.3:
                with self.lock:
                    self.silent.add(peer_id)  # never heartbeats: evicted
            else:
                with self.lock:
                    self.live[host] = (peer_id, client)
        except (VoltClientError, AssertionError) as exc:
            with self.lock:
                self.failures.append(f"{host}: {exc}")

    def heartbeats(self) -> None:
        """Every live host heartbeats every HEARTBEAT seconds until the test ends."""
        with ThreadPoolExecutor(8) as pool:
            while not self.stop.wait(HEARTBEAT):
                with self.lock:
                    live = list(self.live.items())
                list(pool.map(self._beat, live))

    def _beat(self, item: tuple[str, tuple[str, Client]]) -> None:
        host, (peer_id, client) = item
        try:
            answer = client.members.heartbeat(host)
            assert [a["peer_id"] for a in answer] == [peer_id], answer
        except (VoltClientError, AssertionError) as exc:
            with self.lock:
                self.failures.append(f"heartbeat {host}: {exc}")

    def close(self) -> None:
        self.stop.set()
        for client in self.clients:
            client.close()


@pytest.fixture
def burst(masters: list[VoltProcess]) -> Iterator[Burst]:
    state = Burst(masters)
    beater = threading.Thread(target=state.heartbeats, daemon=True)
    beater.start()
    yield state
    state.close()
    beater.join(timeout=10)


def evictors(masters: list[VoltProcess]) -> list[int]:
    return [i for i, m in enumerate(masters) if m.proc and EVICTOR_LINE in m.log()]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    wait_until(predicate, timeout_s=timeout, what=what, backoff=1.0)
    return time.monotonic() - start


def check_store(url: str, burst: Burst) -> None:
    """The trees in the store pass the invariants and hold exactly the expected nodes."""
    executor = load_executor("balanced", fanout=2, parents_per_node=2)
    store = Store(url)
    try:
        service = VoltService(store, executor, node_timeout=NODE_TIMEOUT)
        for tree in service.trees.values():
            check_tree(tree, executor, depth_bound=True)
        found = {peer for tree in service.trees.values() for peer in tree.nodes}
        expected = {peer for peer, _ in burst.live.values()}
        assert found == expected, (
            f"missing {sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]}"
        )
        assert not found & (burst.left | burst.silent)
    finally:
        store.dispose()


def run_burst(burst: Burst, on_half: Callable[[], None] | None = None) -> None:
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(burst.node, i) for i in range(NODES)]
        if on_half is not None:
            wait_for(lambda: burst.placed >= NODES // 2, 30, "half of the burst")
            on_half()
        for f in futures:
            f.result()


def settle(burst: Burst, masters: list[VoltProcess]) -> float:
    """Wait until the silent hosts are evicted; return how long that took."""
    alive = next(m for m in masters if m.proc and m.proc.poll() is None)

    def evicted() -> bool:
        status, members = alive.request("GET", "/v1/members")
        assert status == 200
        peers = {p for m in members for p in m["peer_ids"]}
        return not peers & burst.silent

    return wait_for(evicted, NODE_TIMEOUT + 10, "eviction of the silent hosts")


def test_burst_across_three_masters(masters, burst, database):
    wait_for(lambda: len(evictors(masters)) == 1, 5, "an evictor")
    start = time.monotonic()
    run_burst(burst)
    elapsed = time.monotonic() - start
    assert burst.failures == []
    assert burst.placed == NODES
    assert burst.silent and burst.left and len(burst.live) > NODES // 2
    settle(burst, masters)
    assert burst.failures == []
    assert len(evictors(masters)) == 1, "more than one master ran the evictor"
    check_store(database, burst)
    print(f"burst of {NODES} nodes over 3 masters: {elapsed:.2f}s")


def test_kill_9_of_the_evictor_mid_burst(masters, burst, database):
    wait_for(lambda: len(evictors(masters)) == 1, 5, "an evictor")
    (leader,) = evictors(masters)
    takeover: list[float] = []

    def kill_leader() -> None:
        killed = time.monotonic()
        masters[leader].kill9()
        masters[leader].proc = None  # the fixture does not stop it again
        wait_for(lambda: len(evictors(masters)) == 1, 10, "a new evictor")
        takeover.append(time.monotonic() - killed)

    run_burst(burst, on_half=kill_leader)
    assert burst.failures == [], burst.failures[:5]
    assert burst.placed == NODES
    assert takeover and takeover[0] < TAKEOVER_BOUND, takeover
    settle(burst, masters)
    assert burst.failures == [], burst.failures[:5]
    check_store(database, burst)
    print(f"evictor takeover after kill -9: {takeover[0]:.2f}s")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_two_services_on_one_store(database):
    """In-process: changes made through one service are seen by the other (version reload,
    including a tree deleted and created again), heartbeats are written at most every
    liveness_write_interval, and the evictor lease is exclusive."""
    executor = load_executor("balanced", fanout=2, parents_per_node=2)
    clock = FakeClock()
    a = VoltService(Store(database), executor, node_timeout=60, clock=clock)
    b = VoltService(Store(database), executor, node_timeout=60)
    try:
        for i in range(10):
            service = (a, b)[i % 2]
            placed = service.query("volume-x", f"10.8.0.{i}")
            assert placed.node is not None and placed.node.peer_id is not None
            service.register("volume-x", placed.node.peer_id, f"10.8.0.{i}", "3260", "iqn.x", "1")
        b.leave("volume-x", "10.8.0.4:volume-x")

        def shape(s: VoltService) -> list[tuple[str | None, str | None, list[str | None]]]:
            return [
                (n.peer_id, n.parent.peer_id if n.parent else None, [p.peer_id for p in ps])
                for n, ps in s.volume_nodes("volume-x")
            ]

        assert shape(a) == shape(b) and len(shape(a)) == 9
        check_tree(a.trees["volume-x"], executor, depth_bound=True)
        assert b.delete_volume("volume-x") == 9
        b.query("volume-x", "10.8.0.99")
        assert [p for p, _, _ in shape(a)] == ["10.8.0.99:volume-x"]

        def last_seen(member: str) -> object:
            with a.store.engine.connect() as conn:
                query = "SELECT last_seen FROM volt_members WHERE member = :m"
                return conn.execute(sa.text(query), {"m": member}).scalar_one()

        a.query("volume-y", "10.8.1.1")  # a placement writes the host's liveness at once
        written = last_seen("10.8.1.1")
        pause(0.01)  # the store stamps now(): a second write would differ
        clock.now += 1.0
        a.heartbeat("10.8.1.1")  # within liveness_write_interval: not written
        assert last_seen("10.8.1.1") == written
        clock.now += a.liveness_write_interval
        a.heartbeat("10.8.1.1")
        assert last_seen("10.8.1.1") > written  # type: ignore[operator]

        first, second = EvictorLease(a.store), EvictorLease(b.store)
        assert first.hold() and not second.hold() and first.hold()
        first.release()
        assert second.hold()
        second.release()
    finally:
        a.store.dispose()
        b.store.dispose()
