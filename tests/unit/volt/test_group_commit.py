"""Group commit: concurrent requests share one store transaction (real SQLite files)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa

from tests.unit.volt.invariants import check_tree
from tests.unit.volt.rig import make
from tests.unit.volt.test_service import IQN, snapshot
from volt.errors import StoreUnavailable
from volt.service import VoltService
from volt.validation import make_peer_id

VOLUME = "volume-a"


def count_transactions(service: VoltService) -> list[int]:
    """Record the number of tree changes of each store transaction (group commit)."""
    sizes: list[int] = []
    write_batch = service.store.write_batch

    def counting(writes):
        writes = list(writes)
        sizes.append(len(writes))
        write_batch(writes)

    service.store.write_batch = counting
    return sizes


async def boot(service: VoltService, host: str, answers: dict[str, list[str]]) -> None:
    """One node of a burst, as volt-api runs it: each call in the event loop, its answer
    awaited until its batch is written."""
    while True:  # btree executors: not placeable until a parent is ready
        with service.deferred_commit() as unwritten:
            placement = service.query(VOLUME, host)
        await service.committed(unwritten)
        if placement.node is not None:
            break
        await asyncio.sleep(0)
    peer_id = make_peer_id(host, VOLUME)
    with service.deferred_commit() as unwritten:
        placement = service.register(VOLUME, peer_id, host, "3260", IQN + VOLUME, "1")
    await service.committed(unwritten)
    answers[peer_id] = [p.peer_id for p in placement.parents]


async def burst(service: VoltService, hosts: list[str], answers: dict[str, list[str]]) -> None:
    await asyncio.gather(*(boot(service, host, answers) for host in hosts))


@pytest.mark.parametrize("executor", ["balanced", "btreewithuncle"])
def test_a_burst_is_written_in_few_transactions_and_nothing_is_lost(tmp_path, executor):
    service = make(tmp_path, executor)
    sizes = count_transactions(service)
    hosts = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(400)]
    answers: dict[str, list[str]] = {}
    asyncio.run(burst(service, hosts, answers))

    tree = service.trees[VOLUME]
    assert len(tree) == len(hosts)
    check_tree(tree, service.executor, depth_bound=executor == "balanced")
    assert all(node.ready for node in tree.nodes.values())
    # 800 changes (a query and a register each) in a handful of transactions.
    assert sum(sizes) == 2 * len(hosts)
    assert len(sizes) <= 4 if executor == "balanced" else len(sizes) < len(hosts), sizes
    # No lost update: the store holds exactly what memory serves.
    reloaded = make(tmp_path, executor)
    assert snapshot(reloaded) == snapshot(service)
    # Each answer was the parents the node has once every change is written (or, for a
    # node whose parents changed after it registered, a valid ancestor set then).
    assert set(answers) == set(tree.nodes)


def test_no_answer_before_its_batch_is_written(tmp_path):
    service = make(tmp_path)
    written: list[int] = []
    write_batch = service.store.write_batch

    def recording(writes):
        write_batch(writes)
        written.append(len(list(writes)))

    service.store.write_batch = recording

    async def one(host: str) -> int:
        with service.deferred_commit() as unwritten:
            service.query(VOLUME, host)
        assert unwritten and not unwritten[0].done  # the answer waits for the write
        await service.committed(unwritten)
        return len(written)

    async def main() -> list[int]:
        return await asyncio.gather(*(one(f"10.0.0.{i}") for i in range(1, 21)))

    seen = asyncio.run(main())
    assert all(n >= 1 for n in seen)  # every answer came after a write
    assert written == [20]


def test_a_failed_batch_fails_every_caller_and_changes_nothing(tmp_path):
    service = make(tmp_path)
    for i in range(1, 6):
        service.query(VOLUME, f"10.0.0.{i}")
    before = snapshot(service)

    def broken(*args, **kwargs):
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk full"))

    write_batch = service.store.write_batch
    service.store.write_batch = broken

    async def one(host: str) -> str:
        try:
            with service.deferred_commit() as unwritten:
                service.query(VOLUME, host)
            await service.committed(unwritten)
        except StoreUnavailable:
            return "unavailable"
        return "placed"

    async def main() -> list[str]:
        return await asyncio.gather(*(one(f"10.0.1.{i}") for i in range(1, 11)))

    assert asyncio.run(main()) == ["unavailable"] * 10
    assert snapshot(service) == before
    assert not any(m.host.startswith("10.0.1.") for m in service.member_list())

    service.store.write_batch = write_batch
    assert asyncio.run(main()) == ["placed"] * 10
    assert snapshot(make(tmp_path)) == snapshot(service)


def test_threads_and_the_event_loop_share_batches_without_losing_a_change(tmp_path):
    """The evictor and other threads write their batch at once; meanwhile the event loop's
    requests join the open batch. Every tree stays valid and the store matches memory."""
    service = make(tmp_path)
    errors: list[BaseException] = []

    def thread_nodes(k: int) -> None:
        try:
            for i in range(40):
                host = f"10.{k}.0.{i + 1}"
                service.query(VOLUME, host)
                peer_id = make_peer_id(host, VOLUME)
                service.register(VOLUME, peer_id, host, "3260", IQN + VOLUME, "1")
                if i % 5 == 0:
                    service.leave(VOLUME, peer_id)
                service.evict_expired()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread_nodes, args=(k,)) for k in range(1, 4)]
    for thread in threads:
        thread.start()
    answers: dict[str, list[str]] = {}
    asyncio.run(burst(service, [f"10.9.{i // 250}.{i % 250 + 1}" for i in range(200)], answers))
    for thread in threads:
        thread.join()
    assert errors == []

    tree = service.trees[VOLUME]
    assert len(tree) == 200 + 3 * 32
    check_tree(tree, service.executor, depth_bound=True)
    assert snapshot(make(tmp_path)) == snapshot(service)


def test_without_group_commit_each_change_is_its_own_transaction(tmp_path):
    plain = make(tmp_path)
    service = VoltService(plain.store, plain.executor, node_timeout=60, group_commit=False)
    service.store.write_batch = None  # never used
    answers: dict[str, list[str]] = {}
    asyncio.run(burst(service, [f"10.0.0.{i}" for i in range(1, 31)], answers))
    assert len(service.trees[VOLUME]) == 30
    assert snapshot(make(tmp_path)) == snapshot(service)
