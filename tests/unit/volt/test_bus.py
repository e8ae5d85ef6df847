"""The control bus: which nodes Volt pushes parent changes to, and the whole path over
oslo.messaging's ``fake:/`` transport (Volt's pusher → a node's listener; a node's
notifications → Volt's counts)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from oslo_config import cfg

from brick import bus
from brick.wait import wait_until
from tests.unit.fakes.clock import Clock
from tests.unit.volt.rig import make
from virtman.bus import NodeBus, parse_push
from volt.bus import VoltBus
from volt.metrics import Metrics
from volt.service import VoltService
from volt.store import Store
from volt.topology import load_executor

pytestmark = pytest.mark.unit
IMAGE = "volume-image1"
IQN = "iqn.2010-10.org.openstack:volume-image1"


def node(service: VoltService, host: str, *, register: bool = True) -> str:
    placement = service.query(IMAGE, host)
    assert placement.node is not None and placement.node.peer_id is not None
    if register:
        service.register(IMAGE, placement.node.peer_id, host, "3260", IQN, "1")
    return placement.node.peer_id


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, list[dict]]] = []

    def __call__(self, changes: dict[str, list[dict]]) -> None:
        self.calls.append(changes)

    def hosts(self) -> set[str]:
        return {host for call in self.calls for host in call}


def make_service(tmp_path: Path, clock: Clock | None = None) -> VoltService:
    """Fanout 2, one parent per node (so that a parent's death changes its child's list)."""
    return VoltService(
        Store(f"sqlite:///{tmp_path / 'volt.sqlite'}"),
        load_executor("balanced", fanout=2, parents_per_node=1),
        node_timeout=60,
        clock=clock or Clock(),
    )


def small_tree(tmp_path: Path, clock: Clock | None = None) -> tuple[VoltService, list[str]]:
    """root → A, A2; A → B (hosts 10.0.0.1, .2, .3), everyone registered."""
    service = make_service(tmp_path, clock)
    peers = [node(service, h) for h in ("10.0.0.1", "10.0.0.2", "10.0.0.3")]
    tree = service.trees[IMAGE]
    assert tree.nodes[peers[2]].parent is tree.nodes[peers[0]]
    return service, peers


def parents_now(service: VoltService, host: str) -> list[dict]:
    ((_, parents),) = service.heartbeat(host)
    return [p.identity() for p in parents]


def test_leave_pushes_to_exactly_the_children(tmp_path):
    service, (a, _a2, b) = small_tree(tmp_path)
    pushed = Recorder()
    service.on_parents_changed = pushed
    service.leave(IMAGE, a)
    assert pushed.hosts() == {"10.0.0.3"}
    (entry,) = pushed.calls[0]["10.0.0.3"]
    assert entry["peer_id"] == b
    assert a not in [p["peer_id"] for p in entry["parents"]]
    assert entry["parents"] == parents_now(service, "10.0.0.3")  # what its heartbeat says


def test_eviction_pushes_new_parents(tmp_path):
    clock = Clock()
    service, (_a, _a2, b) = small_tree(tmp_path, clock)
    pushed = Recorder()
    service.on_parents_changed = pushed
    clock.now += 30
    service.heartbeat("10.0.0.2")
    service.heartbeat("10.0.0.3")
    clock.now += 40  # 10.0.0.1 silent for 70 s > node_timeout (60)
    assert service.evict_expired() == ["10.0.0.1"]
    assert pushed.hosts() == {"10.0.0.3"}
    (entry,) = pushed.calls[0]["10.0.0.3"]
    assert entry["peer_id"] == b
    assert entry["parents"] == parents_now(service, "10.0.0.3")


def test_registration_pushes_to_children_of_a_pending_parent(tmp_path):
    service = make_service(tmp_path)
    a = node(service, "10.0.0.1", register=False)
    node(service, "10.0.0.2", register=False)
    b = node(service, "10.0.0.3", register=False)  # still building, reading from above
    tree = service.trees[IMAGE]
    assert tree.nodes[b].parent is tree.nodes[a]
    assert [p["status"] for p in parents_now(service, "10.0.0.3")] == ["pending"]
    pushed = Recorder()
    service.on_parents_changed = pushed
    service.register(IMAGE, a, "10.0.0.1", "3260", IQN, "1")
    assert pushed.hosts() == {"10.0.0.3"}
    (entry,) = pushed.calls[0]["10.0.0.3"]
    assert entry["peer_id"] == b and [p["peer_id"] for p in entry["parents"]] == [a]
    assert entry["parents"][0]["status"] == "OK"  # A can serve it now
    assert entry["parents"] == parents_now(service, "10.0.0.3")


def test_pushes_go_to_exactly_the_changed_nodes(tmp_path):
    service = make(tmp_path)  # balanced, fanout 2, two parents each
    peers = [node(service, f"10.0.1.{i}") for i in range(1, 16)]
    pushed = Recorder()
    service.on_parents_changed = pushed
    tree = service.trees[IMAGE]

    def view() -> dict[str, list[dict]]:
        return {
            n.peer_id: [p.identity() for p in service.executor.parents(tree, n)]
            for n in tree.nodes.values()
        }

    total = 0
    for victim in (peers[1], peers[6], peers[0]):
        pushed.calls.clear()
        before = view()
        service.leave(IMAGE, victim)
        after = view()
        changed = {p for p in after if before.get(p) != after[p]}
        got = {e["peer_id"] for call in pushed.calls for es in call.values() for e in es}
        assert got == changed
        total += len(got)
        for call in pushed.calls:
            for host, entries in call.items():
                for e in entries:
                    assert tree.nodes[e["peer_id"]].member == host
                    assert e["parents"] == after[e["peer_id"]]
    assert total > 0


def test_no_bus_no_work(tmp_path):
    service, (a, _a2, _b) = small_tree(tmp_path)
    assert service.on_parents_changed is None
    assert service._parents_view(service.trees[IMAGE]) == {}
    service.leave(IMAGE, a)  # nothing to call, nothing raised


def test_a_failing_bus_never_fails_the_change(tmp_path):
    service, (a, _a2, _b) = small_tree(tmp_path)

    def broken(changes):
        raise RuntimeError("bus exploded")

    service.on_parents_changed = broken
    service.leave(IMAGE, a)
    assert a not in service.trees[IMAGE].nodes


# -- the node's parser --------------------------------------------------------------------
def test_parse_push():
    parents = [{"host": "10.0.0.1", "port": "3260", "iqn": IQN, "lun": "1", "status": "OK",
                "peer_id": "10.0.0.1:volume-image1"}]  # fmt: skip
    pushed = parse_push("10.0.0.3", "10.0.0.3", [{"peer_id": "p", "parents": parents}])
    assert list(pushed) == ["p"] and pushed["p"][0].host == "10.0.0.1"
    with pytest.raises(ValueError, match="not"):
        parse_push("10.0.0.3", "10.0.0.4", [])
    for bad in (None, [1], [{"peer_id": 3}], [{"peer_id": "p", "parents": "x"}]):
        with pytest.raises(ValueError):
            parse_push("10.0.0.3", "10.0.0.3", bad)


# -- failure handling ----------------------------------------------------------------------
def test_sender_logs_an_outage_once_and_the_recovery(caplog):
    up = threading.Event()

    def send(item):
        if not up.is_set():
            raise ConnectionError("broker down")

    health = bus.Health("test")
    sender = bus.Sender("test-sender", send, health)
    caplog.set_level(logging.WARNING, logger="brick.bus")
    for i in range(5):
        sender.put(i)
    assert sender.flush()
    assert health.down and health.failures == 5
    assert len([r for r in caplog.records if "unreachable" in r.message]) == 1
    up.set()
    sender.put("again")
    assert sender.flush()
    assert not health.down
    assert len([r for r in caplog.records if "works again" in r.message]) == 1
    sender.stop()


def test_safe_url_hides_the_password():
    assert bus.safe_url("rabbit://u:secret@127.0.0.1:5672/") == "rabbit://u:***@127.0.0.1:5672/"
    assert bus.safe_url("fake:/") == "fake:/"


# -- both ends over fake:/ -----------------------------------------------------------------
@pytest.fixture
def transports():
    conf = cfg.CONF
    rpc = bus.rpc_transport(conf, "fake:/")
    notifications = bus.notification_transport(conf, "fake:/")
    yield rpc, notifications
    rpc.cleanup()
    notifications.cleanup()


def test_push_and_events_over_the_fake_transport(tmp_path, transports):
    metrics = Metrics()
    volt = VoltBus("fake:/", metrics=metrics, transports=transports).start()
    got: dict[str, list[dict]] = {}
    other: list[dict] = []
    mine = NodeBus("fake:/", "10.0.0.3", got.update, transports=transports).start()
    theirs = NodeBus("fake:/", "10.0.0.9", other.append, transports=transports)
    theirs.start()
    try:
        assert mine.wait_started(10) and theirs.wait_started(10)
        service, (a, _a2, b) = small_tree(tmp_path)
        service.on_parents_changed = volt.push
        service.leave(IMAGE, a)
        wait_until(lambda: b in got, timeout_s=10, what="the push to arrive")
        assert [p.peer_id for p in got[b]] == [
            p["peer_id"] for p in parents_now(service, "10.0.0.3")
        ]
        assert other == []  # only the affected host hears of it
        assert mine.pushes == 1 and volt.pusher.pushed["10.0.0.3"] == 1

        mine.event(bus.EVENT_STACK_BUILT, {"image": IMAGE, "peer_id": b})
        mine.event(bus.EVENT_STACK_FAILED, {"image": IMAGE, "error": "x"}, error=True)
        wait_until(lambda: sum(volt.events.counts.values()) == 2, timeout_s=10, what="the events")
        assert volt.events.counts[bus.EVENT_STACK_BUILT] == 1
        assert volt.events.counts[bus.EVENT_STACK_FAILED] == 1
        value = metrics.registry.get_sample_value(
            "volt_node_events_total", {"event_type": bus.EVENT_STACK_FAILED}
        )
        assert value == 1
    finally:
        mine.stop()
        theirs.stop()
        volt.stop()


def test_a_push_for_another_host_is_ignored(transports):
    got: list[dict] = []
    mine = NodeBus("fake:/", "10.0.0.3", got.append, transports=transports)
    mine.received("10.0.0.4", [])
    mine.received("10.0.0.3", "garbage")
    assert got == [] and mine.rejected == 2
    mine.sender.stop()


def test_the_drivers_reconnect_errors_are_logged_once_per_outage(caplog):
    bus.quiet_reconnects()
    bus.quiet_reconnects()  # idempotent
    log = logging.getLogger("oslo.messaging._drivers.impl_rabbit")
    caplog.set_level(logging.INFO, logger="oslo.messaging._drivers.impl_rabbit")
    for _ in range(5):
        log.error("AMQP server on 127.0.0.1:5672 is unreachable: refused. Trying again")
    log.info("Reconnected to AMQP server on 127.0.0.1:5672")
    log.error("AMQP server on 127.0.0.1:5672 is unreachable: again")
    log.info("Reconnected to AMQP server on 127.0.0.1:5672")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 2
    assert "after 4 failed attempts not logged" in messages[1]
    assert len(messages) == 4


@pytest.mark.parametrize("executor", ["btree", "btreewithuncle"])
def test_the_btree_executors_push_exactly_the_changed_nodes(tmp_path, executor):
    service = make(tmp_path, executor)
    peers = [node(service, f"10.0.2.{i}") for i in range(1, 12)]  # each registers first
    pushed = Recorder()
    service.on_parents_changed = pushed
    tree = service.trees[IMAGE]

    def view() -> dict[str, list[dict]]:
        return {
            n.peer_id: [p.identity() for p in service.executor.parents(tree, n)]
            for n in tree.nodes.values()
        }

    total = 0
    for victim in (peers[1], peers[4], peers[0]):
        pushed.calls.clear()
        before = view()
        service.leave(IMAGE, victim)
        after = view()
        changed = {p for p in after if before.get(p) != after[p]}
        got = {e["peer_id"] for call in pushed.calls for es in call.values() for e in es}
        assert got == changed
        total += len(got)
    assert total > 0
