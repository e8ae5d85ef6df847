"""VoltService: liveness, eviction, write-through persistence (real SQLite files)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fakes.clock import Clock
from tests.unit.volt.invariants import check_tree
from tests.unit.volt.rig import make
from volt.errors import NotPlaceable, PeerNotFound, StoreUnavailable, VolumeNotFound
from volt.service import VoltService
from volt.store import Store
from volt.topology import load_executor
from volt.validation import make_peer_id

IQN = "iqn.2010-10.org.openstack:"


def snapshot(service: VoltService) -> dict:
    """Everything a client can observe: tree shape, node fields, and parents served."""
    result = {}
    for volume_id, tree in service.trees.items():
        result[volume_id] = {
            peer_id: (
                node.parent.peer_id,
                node.slot,
                node.depth,
                node.status,
                node.identity(),
                [p.peer_id for p in service.executor.parents(tree, node)],
            )
            for peer_id, node in tree.nodes.items()
        }
    return result


def register(service: VoltService, volume: str, host: str) -> None:
    service.register(volume, make_peer_id(host, volume), host, "3260", IQN + volume, "1")


def test_silent_host_is_evicted_and_children_reparented(tmp_path):
    clock = Clock()
    service = make(tmp_path, clock=clock)
    hosts = [f"10.0.0.{i}" for i in range(1, 8)]
    for host in hosts:
        service.query("volume-a", host)
        register(service, "volume-a", host)
    service.query("volume-b", "10.0.0.1")
    child = service.trees["volume-a"].nodes["10.0.0.3:volume-a"]
    assert child.parent.peer_id == "10.0.0.1:volume-a"

    clock.now += 45
    for host in hosts[1:]:
        service.heartbeat(host)
    clock.now += 30  # 10.0.0.1 silent for 75 s > 60 s; the others for 30 s
    assert service.evict_expired() == ["10.0.0.1"]
    assert "10.0.0.1:volume-a" not in service.trees["volume-a"].nodes
    assert "volume-b" not in service.trees  # its only node was evicted
    # The next heartbeat of the orphaned child carries its new parents.
    [(node, parents)] = service.heartbeat("10.0.0.3")
    assert node.peer_id == "10.0.0.3:volume-a"
    assert parents and all(p.peer_id != "10.0.0.1:volume-a" for p in parents)
    assert service.heartbeat("10.0.0.1") == []
    check_tree(service.trees["volume-a"], service.executor, depth_bound=True)
    # Eviction is in the store too, and so is a leave.
    assert snapshot(make(tmp_path)) == snapshot(service)
    service.leave("volume-a", "10.0.0.2:volume-a")
    assert snapshot(make(tmp_path)) == snapshot(service)


def test_restart_gives_every_host_a_fresh_timeout(tmp_path):
    clock = Clock()
    service = make(tmp_path, clock=clock)
    service.query("volume-a", "10.0.0.1")
    service.store.dispose()
    clock.now += 3600  # volt-api was down for an hour
    restarted = make(tmp_path, clock=clock)
    assert restarted.evict_expired() == []
    clock.now += 61
    assert restarted.evict_expired() == ["10.0.0.1"]


def test_unknown_volume_and_peer(tmp_path):
    service = make(tmp_path)
    with pytest.raises(VolumeNotFound):
        register(service, "volume-a", "10.0.0.1")
    service.query("volume-a", "10.0.0.2")
    with pytest.raises(PeerNotFound):
        register(service, "volume-a", "10.0.0.1")
    with pytest.raises(PeerNotFound):
        service.leave("volume-a", "10.0.0.1:volume-a")
    assert service.delete_volume("volume-a") == 1
    with pytest.raises(VolumeNotFound):
        service.delete_volume("volume-a")
    assert service.member_list() == []


def test_failed_store_write_changes_nothing(tmp_path):
    service = make(tmp_path)
    for i in range(1, 6):
        service.query("volume-a", f"10.0.0.{i}")
    before = snapshot(service)

    def broken(*args, **kwargs):
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk full"))

    service.store.save = service.store.write_batch = broken  # per change, or group commit
    with pytest.raises(StoreUnavailable):
        service.query("volume-a", "10.0.0.9")
    with pytest.raises(StoreUnavailable):
        service.leave("volume-a", "10.0.0.1:volume-a")
    assert snapshot(service) == before
    assert "10.0.0.9" not in {m.host for m in service.member_list()}


ops = st.lists(
    st.tuples(
        st.sampled_from(["query", "register", "leave", "heartbeat", "tick", "evict", "drop"]),
        st.integers(0, 7),
        st.sampled_from(["volume-a", "volume-b:x"]),
    ),
    max_size=80,
)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["balanced", "btree", "btreewithuncle"]), ops)
def test_store_always_matches_memory(executor, operations):
    """After any sequence (evictions included), a fresh service loaded from the store
    serves exactly the same trees and parents."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        clock = Clock()
        service = make(path, executor, clock)
        for op, i, volume in operations:
            host = f"10.0.{i}.1" if i % 2 else f"fd00::{i}"
            peer_id = make_peer_id(host, volume)
            known = volume in service.trees and peer_id in service.trees[volume].nodes
            if op == "query":
                service.query(volume, host)
            elif op == "register" and known:
                register(service, volume, host)
            elif op == "leave" and known:
                service.leave(volume, peer_id)
            elif op == "heartbeat":
                service.heartbeat(host)
            elif op == "tick":
                clock.now += 25
            elif op == "evict":
                service.evict_expired()
            elif op == "drop" and volume in service.trees:
                service.delete_volume(volume)
            for tree in service.trees.values():
                check_tree(tree, service.executor, depth_bound=executor == "balanced")
        reloaded = make(path, executor, clock)
        assert snapshot(reloaded) == snapshot(service)
        service.store.dispose()
        reloaded.store.dispose()


def test_store_outage_makes_the_tree_wait_then_recovers(tmp_path):
    service = make(tmp_path)
    for i in range(1, 6):
        service.query("volume-a", f"10.0.0.{i}")
    service.query("volume-b", "10.0.0.1")
    before = snapshot(service)

    def down(*args, **kwargs):
        raise sa.exc.OperationalError("SELECT", {}, Exception("connection refused"))

    save, load, write_batch = service.store.save, service.store.load, service.store.write_batch
    service.store.save = service.store.load = service.store.write_batch = down
    with pytest.raises(StoreUnavailable):
        service.leave("volume-a", "10.0.0.1:volume-a")
    # The tree waits for the store; no answer is built from unsaved state.
    with pytest.raises(StoreUnavailable):
        service.query("volume-a", "10.0.0.1")
    with pytest.raises(StoreUnavailable):
        service.volume_nodes("volume-a")
    assert [p.peer_id for p, _ in service.volume_nodes("volume-b")] == ["10.0.0.1:volume-b"]
    service.retry_unloaded()
    assert "volume-a" in service.unloaded

    service.store.save, service.store.load = save, load
    service.store.write_batch = write_batch
    service.retry_unloaded()
    assert service.unloaded == set()
    assert snapshot(service) == before


def test_a_repeated_query_refreshes_liveness(tmp_path):
    clock = Clock()
    service = make(tmp_path, clock=clock)
    service.query("volume-a", "10.0.0.1")
    clock.now += 50
    service.query("volume-a", "10.0.0.1")
    clock.now += 50
    assert service.evict_expired() == []


def test_a_tree_is_dropped_when_its_last_node_leaves(tmp_path):
    service = make(tmp_path)
    service.query("volume-a", "10.0.0.1")
    service.leave("volume-a", "10.0.0.1:volume-a")
    assert service.volume_counts() == []
    assert make(tmp_path).volume_counts() == []


@pytest.mark.parametrize(("fanout", "image_server_fanout"), [(2, None), (3, None), (4, 1)])
def test_register_answers_ready_parents_in_a_burst(tmp_path, fanout, image_server_fanout):
    """Issue 15: in a burst every node is placed before any registers, so its query
    answered only pending parents. The register answer gives the parents after the node was
    lifted above its pending ancestors: its tree parent (ready) first, never a pending one,
    and the same list a heartbeat would answer."""
    service = VoltService(
        Store(f"sqlite:///{tmp_path / 'volt.sqlite'}"),
        load_executor("balanced", fanout=fanout, image_server_fanout=image_server_fanout),
        node_timeout=60,
        clock=Clock(),
    )
    hosts = [f"10.1.{i // 250}.{1 + i % 250}" for i in range(60)]
    for host in hosts:
        service.query("volume-a", host)
    order = hosts[::-1][:30] + hosts[:30]  # registrations in another order than placement
    for host in order:
        peer_id = make_peer_id(host, "volume-a")
        placement = service.register("volume-a", peer_id, host, "3260", IQN + "volume-a", "1")
        node = placement.node
        assert node is not None and node.peer_id == peer_id and node.ready
        assert all(p.ready for p in placement.parents)
        if node.parent.is_root:
            assert placement.parents == []
        else:
            assert placement.parents[0] is node.parent
        [(same, beat)] = service.heartbeat(host)
        assert same is node and beat == placement.parents
        check_tree(service.trees["volume-a"], service.executor, depth_bound=True)


def test_image_server_fanout_bounds_the_top_level_only_and_survives_a_restart(tmp_path):
    """[balanced] image_server_fanout = 1, fanout = 4: one node reads from the image server,
    four below each node (16 nodes: depth 3, not 4 as with fanout 2); a restarted Volt
    reloads the tree with the same top level, even under another configuration."""
    url = f"sqlite:///{tmp_path / 'volt.sqlite'}"
    executor = load_executor("balanced", fanout=4, image_server_fanout=1)
    service = VoltService(Store(url), executor, node_timeout=60, clock=Clock())
    hosts = [f"10.3.0.{i}" for i in range(1, 17)]
    for host in hosts:
        service.register(
            "volume-a", make_peer_id(host, "volume-a"), host, "3260", IQN + "volume-a", "1",
            place=True,
        )  # fmt: skip
    tree = service.trees["volume-a"]
    assert (tree.fanout, tree.root_fanout, len(tree.root.children)) == (4, 1, 1)
    assert len(tree.root.child_nodes()) == 1 and tree.max_depth() == 3
    assert max(len(n.child_nodes()) for n in tree.nodes.values()) == 4
    check_tree(tree, executor, depth_bound=True)
    other = load_executor("balanced", fanout=2)  # the option changed: old trees keep theirs
    again = VoltService(Store(url), other, node_timeout=60, clock=Clock())
    again.query("volume-a", "10.3.0.1")
    reloaded = again.trees["volume-a"]
    assert (reloaded.fanout, reloaded.root_fanout) == (4, 1)
    assert [n.peer_id for n in reloaded.bfs()] == [n.peer_id for n in tree.bfs()]
    again.query("volume-b", "10.3.0.1")
    assert (again.trees["volume-b"].fanout, again.trees["volume-b"].root_fanout) == (2, 2)


def test_register_with_place_places_and_registers_in_one_request(tmp_path):
    """Issue 15: one request per node of a burst. Each register with ``place`` places the
    node and registers it: the tree is the same shape as query + register would build, the
    answer names only ready parents, and the store holds it all (a restart sees it)."""
    service = make(tmp_path)
    hosts = [f"10.2.0.{i}" for i in range(1, 40)]
    for host in hosts:
        peer_id = make_peer_id(host, "volume-a")
        placement = service.register(
            "volume-a", peer_id, host, "3260", IQN + "volume-a", "1", place=True
        )
        node = placement.node
        assert node is not None and node.peer_id == peer_id and node.ready
        assert all(p.ready for p in placement.parents)
        assert placement.parents[:1] == ([] if node.parent.is_root else [node.parent])
        check_tree(service.trees["volume-a"], service.executor, depth_bound=True)
    assert service.volume_counts() == [("volume-a", len(hosts))]
    again = service.register(
        "volume-a", make_peer_id(hosts[5], "volume-a"), hosts[5], "3260", IQN + "volume-a", "1",
        place=True,
    )  # fmt: skip
    assert service.volume_counts() == [("volume-a", len(hosts))]  # idempotent
    assert again.node is service.trees["volume-a"].nodes[make_peer_id(hosts[5], "volume-a")]
    assert snapshot(make(tmp_path)) == snapshot(service)


def test_a_placing_registration_logs_one_line_with_the_placement(tmp_path, caplog):
    """A burst is one request per node: one INFO line each (a line costs Volt CPU in a
    burst), which still says where the node was placed and what it registered."""
    service = make(tmp_path)
    for host in ("10.2.0.1", "10.2.0.2", "10.2.0.3"):
        caplog.clear()
        with caplog.at_level("INFO", logger="volt.service"):
            placement = service.register(
                "volume-a", make_peer_id(host, "volume-a"), host, "3260", IQN + "a", "1",
                place=True,
            )  # fmt: skip
        node = placement.node
        assert node is not None
        lines = [r.getMessage() for r in caplog.records]
        parent = None if node.parent.is_root else node.parent.peer_id
        assert lines == [
            f"registered {node.peer_id} in volume-a at depth {node.depth} under {parent}: "
            f"{host}:3260 {IQN}a lun 1"
        ]
    caplog.clear()
    with caplog.at_level("INFO", logger="volt.service"):
        service.query("volume-a", "10.2.0.4")  # a query still logs its placement
    placed = service.trees["volume-a"].nodes[make_peer_id("10.2.0.4", "volume-a")]
    assert [r.getMessage() for r in caplog.records] == [
        f"placed {placed.peer_id} in volume-a at depth {placed.depth} under {placed.parent.peer_id}"
    ]


def test_register_without_place_still_needs_a_query(tmp_path):
    service = make(tmp_path)
    with pytest.raises(VolumeNotFound):
        register(service, "volume-a", "10.0.0.1")
    service.query("volume-a", "10.0.0.1")
    with pytest.raises(PeerNotFound):
        register(service, "volume-a", "10.0.0.2")
    assert service.volume_counts() == [("volume-a", 1)]


def test_register_with_place_when_btree_cannot_place_changes_nothing(tmp_path):
    service = VoltService(
        Store(f"sqlite:///{tmp_path / 'volt.sqlite'}"),
        load_executor("btree"),
        node_timeout=60,
        clock=Clock(),
    )
    for host in ("10.0.0.1", "10.0.0.2"):  # the root's two slots, both pending
        service.query("volume-a", host)
    before = snapshot(service)
    peer_id = make_peer_id("10.0.0.3", "volume-a")
    with pytest.raises(NotPlaceable) as err:
        service.register("volume-a", peer_id, "10.0.0.3", "3260", IQN + "a", "1", place=True)
    assert err.value.status == 409 and err.value.code == "volt.peer.not_placeable"
    assert str(err.value) == f"peer {peer_id!r} cannot be placed in volume 'volume-a' yet"
    assert snapshot(service) == before
