"""The cluster controller's dispatch over the control bus (volt/cluster/busdispatch.py):
end to end over oslo.messaging's ``fake:/`` transport (controller → the nodes' queues, the
nodes' notifications → the task's events), the nodes' checks, and the fall back to XML-RPC
when the broker is down, goes down mid-call or a node does not answer."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oslo_messaging
import pytest
from oslo_config import cfg

from brick import bus
from brick.wait import wait_until
from tests.unit.fakes.clock import Clock
from tests.unit.volt.cluster_fakes import FakeNode, call
from virtman.bus import GuestRefused, NodeBus
from volt.api.app import VoltApp
from volt.bus import VoltBus
from volt.cluster import busdispatch
from volt.cluster.busdispatch import BusDispatch
from volt.cluster.capacity import CapacityCache
from volt.cluster.controller import Controller
from volt.cluster.nodes import NodeEndpoint
from volt.service import VoltService
from volt.store import Store
from volt.topology import load_executor

pytestmark = pytest.mark.unit
BURST = {"image": "tiny", "count": 4, "flavor": {"vcpus": 1, "memory_mb": 128}}


class GuestVerbs:
    """What a node's ``virtman.server.Methods`` is to its bus endpoint, over a FakeNode."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.calls: list[str] = []

    def _run(self, method: str, *args: Any) -> Any:
        self.calls.append(method)
        return self.node.call(method, *args)

    def guest_create_once(self, userid: str, vcpus: int, memory_mb: int, disk_gb: int = 0) -> bool:
        if userid in self.node.guests:
            return False
        return bool(self._run("guest_create", userid, vcpus, memory_mb, disk_gb))

    def guest_deploy_once(self, userid: str, image: str) -> bool:
        return bool(self._run("guest_deploy", userid, image))

    def guest_action(self, userid: str, action: str) -> bool:
        return bool(self._run("guest_action", userid, action))

    def guest_power_state(self, userid: str) -> str:
        return str(self._run("guest_power_state", userid))

    def guest_delete(self, userid: str) -> bool:
        return bool(self._run("guest_delete", userid))


class XmlRpc:
    """The node's XML-RPC client as the controller sees it, counting its calls."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.calls: Counter[str] = Counter()

    def call(self, method: str, *args: Any) -> Any:
        self.calls[method] += 1
        if method.endswith("_once"):  # the node's own idempotent verbs
            return getattr(GuestVerbs(self.node), method)(*args)
        return self.node.call(method, *args)


@pytest.fixture
def transports() -> Iterator[tuple[Any, Any]]:
    rpc = bus.rpc_transport(cfg.CONF, "fake:/")
    notifications = bus.notification_transport(cfg.CONF, "fake:/")
    yield rpc, notifications
    rpc.cleanup()
    notifications.cleanup()


def bus_node(i: int) -> FakeNode:
    node = FakeNode(f"n{i}", vcpus=2, memory_mb=1024)
    node.on_bus = f"10.0.0.{i}"  # the node's host_ip, its bus queue
    node.endpoint = NodeEndpoint(f"n{i}", f"http://node{i}.example:7774/RPC2", token=f"token{i}")
    return node


class BusRig:
    def __init__(self, tmp_path: Path, transports: tuple[Any, Any]) -> None:
        self.nodes = {n.endpoint.id: n for n in (bus_node(1), bus_node(2))}
        self.xmlrpc = {i: XmlRpc(n) for i, n in self.nodes.items()}
        self.verbs = {i: GuestVerbs(n) for i, n in self.nodes.items()}
        self.node_buses = []
        for node_id, node in self.nodes.items():
            nb = NodeBus("fake:/", node.on_bus, dict, transports=transports)
            nb.serve_guests(self.verbs[node_id], node.endpoint.token)
            self.node_buses.append(nb.start())
        self.volt_bus = VoltBus("fake:/", transports=transports).start()
        endpoints = [n.endpoint for n in self.nodes.values()]
        capacity = self.capacity = CapacityCache(
            endpoints, lambda e: self.nodes[e.id].call("guest_host_info"), 1
        )
        self.store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
        self.dispatch = BusDispatch(transports[0], call_timeout=5.0)
        self.controller = Controller(
            self.store,
            endpoints,
            workers=4,
            client_factory=lambda endpoint, timeout: self.xmlrpc[endpoint.id],
            capacity=capacity,
            bus=self.dispatch,
        )
        capacity.refresh_all()
        self.volt_bus.events.on_guest = self.controller.node_event
        service = VoltService(self.store, load_executor("balanced"), node_timeout=60)
        self.app = VoltApp(service, auth_token="admin", cluster=self.controller)
        for nb in self.node_buses:
            assert nb.wait_started(10)

    def wait_done(self, task: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            status, view, _ = call(self.app, "GET", f"/v1/clusters/{task}")
            assert status == 200
            return view if view["status"] not in ("IN_PROGRESS", "DELETING") else None

        return wait_until(done, timeout_s=20, what=f"task {task}", max_interval_s=0.02)

    def close(self) -> None:
        self.controller.close()
        for nb in self.node_buses:
            nb.stop()
        self.volt_bus.stop()
        self.store.dispose()


@pytest.fixture
def rig(tmp_path: Path, transports: tuple[Any, Any]) -> Iterator[BusRig]:
    r = BusRig(tmp_path, transports)
    yield r
    r.close()


def test_a_burst_goes_over_the_bus_and_the_nodes_events_reach_the_task(rig: BusRig) -> None:
    status, answer, _ = call(rig.app, "POST", "/v1/clusters", BURST)
    assert status == 202, answer
    view = rig.wait_done(answer["task"])
    assert view["status"] == "DONE", view
    for vm in view["vms"]:
        assert vm["dispatch"] == {"bus": 3, "xmlrpc": 0}, vm
    # no guest verb over XML-RPC: every one reached a node's bus endpoint
    assert all(xml.calls == {} for xml in rig.xmlrpc.values())
    assert sum(len(v.calls) for v in rig.verbs.values()) == 4 * 3
    assert rig.dispatch.answered == {"bus": 12}

    def node_events() -> dict[str, Any] | None:
        _status, view, _ = call(rig.app, "GET", f"/v1/clusters/{answer['task']}")
        found = [e for vm in view["vms"] for e in vm["events"] if e["source"] != "controller"]
        return view if len(found) == 4 * 3 * 2 else None

    view = wait_until(node_events, timeout_s=10, what="the nodes' progress events")
    for vm in view["vms"]:
        from_node = [e for e in vm["events"] if e["source"] != "controller"]
        assert {e["source"] for e in from_node} == {rig.nodes[vm["node"]].on_bus}
        assert sorted((e["step"], e["detail"]) for e in from_node) == sorted(
            (step, state)
            for step in ("guest_create_once", "guest_deploy_once", "guest_action")
            for state in ("started", "done")
        )


def test_a_node_not_on_the_bus_gets_xmlrpc_at_once(rig: BusRig) -> None:
    rig.nodes["n2"].on_bus = None  # its host info no longer says bus (no transport_url)
    rig.capacity.refresh_all()
    _status, answer, _ = call(rig.app, "POST", "/v1/clusters", BURST)
    view = rig.wait_done(answer["task"])
    assert view["status"] == "DONE", view
    for vm in view["vms"]:
        want = {"bus": 3, "xmlrpc": 0} if vm["node"] == "n1" else {"bus": 0, "xmlrpc": 3}
        assert vm["dispatch"] == want, vm
    assert rig.verbs["n2"].calls == [] and rig.dispatch.answered == {"bus": 6}


def test_the_node_refuses_calls_not_for_it(rig: BusRig) -> None:
    node = rig.nodes["n1"]
    nb = rig.node_buses[0]
    client = oslo_messaging.get_rpc_client(
        rig.dispatch._rpc.transport,
        oslo_messaging.Target(topic=bus.NODE_TOPIC, namespace=bus.GUEST_NAMESPACE),
    ).prepare(server="10.0.0.1", timeout=5)
    good = {"token": node.endpoint.token}
    args = ["VM1", 1, 128, 0]
    for ctxt, host, method in [
        ({"token": "wrong"}, "10.0.0.1", "guest_create_once"),  # wrong token
        ({}, "10.0.0.1", "guest_create_once"),  # no token
        (good, "10.0.0.2", "guest_create_once"),  # another host's
        (good, "10.0.0.1", "guest_orphans"),  # not a bus verb
    ]:
        # rabbit: a RemoteError naming it; fake:/ raises the node's exception itself
        with pytest.raises((oslo_messaging.RemoteError, GuestRefused), match=r"token|host|verb"):
            client.call(ctxt, bus.GUEST_CALL, host=host, verb=method, args=args)
    with pytest.raises((oslo_messaging.RemoteError, GuestRefused), match="userid first"):
        client.call(good, bus.GUEST_CALL, host="10.0.0.1", verb="guest_delete", args=[])
    assert rig.verbs["n1"].calls == [] and node.guests == {}
    assert nb.rejected == 5
    assert client.call(good, bus.GUEST_CALL, host="10.0.0.1", verb="guest_create_once",
                       args=args) is True  # fmt: skip
    assert "VM1" in node.guests


def test_an_event_about_a_vm_on_another_node_is_ignored(rig: BusRig) -> None:
    _status, answer, _ = call(rig.app, "POST", "/v1/clusters", {**BURST, "count": 1})
    view = rig.wait_done(answer["task"])
    (vm,) = view["vms"]
    other = "10.0.0.2" if vm["node"] == "n1" else "10.0.0.1"
    payload = {"userid": vm["userid"], "step": "guest_action", "state": "done", "host": other}
    assert not rig.controller.node_event(f"virtman.{other}", bus.EVENT_GUEST_PROGRESS, payload)
    mine = dict(payload, host=rig.nodes[vm["node"]].on_bus)
    assert not rig.controller.node_event(f"virtman.{other}", bus.EVENT_GUEST_PROGRESS, mine)
    assert rig.controller.node_event(f"virtman.{mine['host']}", bus.EVENT_GUEST_PROGRESS, mine)
    assert not rig.controller.node_event(
        f"virtman.{mine['host']}", bus.EVENT_GUEST_PROGRESS, dict(mine, step="rm -rf")
    )


# -- failure modes, with the bus's client stubbed ------------------------------------------------
class StubRpc:
    """Stands in for the oslo.messaging client: ``mode`` down (publish fails), silent
    (no answer), hang (waits for ``release``), or up."""

    def __init__(self) -> None:
        self.mode = "up"
        self.sent = 0
        self.release = threading.Event()

    def prepare(self, **kw: Any) -> StubRpc:
        return self

    def call(self, ctxt: Any, method: str, **kw: Any) -> Any:
        self.sent += 1
        if self.mode == "down":
            raise oslo_messaging.MessageDeliveryFailure("Unable to connect to AMQP server")
        if self.mode == "silent":
            raise oslo_messaging.MessagingTimeout("no reply")
        if self.mode == "hang":
            self.release.wait(10)
        return "bus-answer"

    def cast(self, ctxt: Any, method: str, **kw: Any) -> None:
        if self.mode == "down":
            raise oslo_messaging.MessageDeliveryFailure("Unable to connect to AMQP server")


@pytest.fixture
def stubbed(transports: tuple[Any, Any]) -> Iterator[tuple[BusDispatch, StubRpc, Clock]]:
    clock = Clock()
    dispatch = BusDispatch(transports[0], call_timeout=5.0, clock=clock)
    stub = StubRpc()
    dispatch._rpc = dispatch._probe = stub
    yield dispatch, stub, clock
    dispatch.close()


def test_broker_down_goes_xmlrpc_logs_once_and_comes_back(stubbed, caplog) -> None:
    dispatch, stub, clock = stubbed
    node = bus_node(1)
    node.call("guest_create", "VM1", 1, 128)
    xml = XmlRpc(node)
    client = dispatch.client(node.endpoint, "10.0.0.1", 10, xml)
    caplog.set_level(logging.WARNING, logger="brick.bus")
    assert client.call("guest_create_once", "VM1", 1, 128, 0) == "bus-answer"
    assert client.via == "bus"
    stub.mode = "down"
    # XML-RPC answered (False: the guest was there already, nothing made twice)
    assert client.call("guest_create_once", "VM1", 1, 128, 0) is False
    assert client.via == "xmlrpc" and dispatch.health.down
    sent = stub.sent
    for _ in range(3):
        client.call("guest_power_state", "VM1")
    assert stub.sent == sent  # while down, no call tries the bus
    assert not dispatch.probe()
    downs = [r for r in caplog.records if "unreachable" in r.message]
    assert len(downs) == 1 and "XML-RPC" in downs[0].message
    stub.mode = "up"
    assert dispatch.probe()
    client.call("guest_power_state", "VM1")
    assert client.via == "xmlrpc"  # the nodes' queues need a moment to come back
    clock.now += busdispatch.RECOVERY_GRACE_S
    client.call("guest_power_state", "VM1")
    assert client.via == "bus"
    assert len([r for r in caplog.records if "works again" in r.message]) == 1
    assert xml.calls == {"guest_create_once": 1, "guest_power_state": 4}


def test_a_call_waiting_when_the_broker_dies_goes_xmlrpc(stubbed) -> None:
    dispatch, stub, _ = stubbed
    node = bus_node(1)
    xml = XmlRpc(node)
    node.call("guest_create", "VM1", 1, 128)
    client = dispatch.client(node.endpoint, "10.0.0.1", 10, xml)
    stub.mode = "hang"
    answers: list[Any] = []
    waiter = threading.Thread(target=lambda: answers.append(client.call("guest_action", "VM1",
                                                                        "start")))  # fmt: skip
    waiter.start()
    wait_until(lambda: stub.sent == 1, timeout_s=5, what="the bus call")
    stub.mode = "down"  # the prober (every second, while a call waits) sees it
    waiter.join(5)
    assert not waiter.is_alive() and answers == [True]
    assert client.via == "xmlrpc" and xml.calls == {"guest_action": 1}
    stub.release.set()


def test_a_node_that_does_not_answer_gets_xmlrpc_for_a_while(stubbed) -> None:
    dispatch, stub, clock = stubbed
    one, two = bus_node(1), bus_node(2)
    one.call("guest_create", "VM1", 1, 128)
    stub.mode = "silent"
    client = dispatch.client(one.endpoint, "10.0.0.1", 10, XmlRpc(one))
    assert client.call("guest_power_state", "VM1") == "off"
    assert client.via == "xmlrpc"
    assert not dispatch.usable("n1") and dispatch.usable("n2")
    assert not dispatch.health.down  # the broker is fine: that node is silent
    clock.now += busdispatch.SILENT_S
    assert dispatch.usable("n1")
    stub.mode = "up"
    assert (
        dispatch.client(two.endpoint, "10.0.0.2", 10, XmlRpc(two)).call("guest_delete", "X")
        == "bus-answer"
    )


def test_only_the_guest_verbs_travel(stubbed) -> None:
    dispatch, stub, _ = stubbed
    node = bus_node(1)
    xml = XmlRpc(node)
    client = dispatch.client(node.endpoint, "10.0.0.1", 10, xml)
    client.call("guest_host_info")
    client.call("guest_create", "VM1", 1, 128)  # not idempotent: never over the bus
    assert stub.sent == 0 and xml.calls == {"guest_host_info": 1, "guest_create": 1}
