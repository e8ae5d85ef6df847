"""The cluster controller (volt/cluster): placement properties, the VM state machine, the
Snooze bodies of seed 003, and the routes through volt-api's RSGI app with fake nodes."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brick.wait import wait_until
from tests.unit.volt.cluster_fakes import FakeNode, call, client_factory
from volt.api.app import VoltApp
from volt.cluster import model, snooze
from volt.cluster.capacity import CapacityCache
from volt.cluster.controller import Controller
from volt.cluster.model import VMSpec
from volt.cluster.nodes import parse_nodes
from volt.cluster.placement import Demand, InsufficientCapacity, Room, place
from volt.errors import InvalidInput
from volt.service import VoltService
from volt.store import Store
from volt.topology import load_executor

DATA = Path(__file__).parent / "data"
SEED_START = (DATA / "snooze_start_virtual_cluster.json").read_bytes()

rooms_st = st.lists(
    st.builds(
        Room,
        node_id=st.sampled_from([f"n{i}" for i in range(8)]),
        vcpus=st.integers(0, 16),
        memory_mb=st.integers(0, 8192),
    ),
    max_size=6,
    unique_by=lambda r: r.node_id,
)
demands_st = st.lists(
    st.builds(Demand, vcpus=st.integers(1, 4), memory_mb=st.integers(64, 2048)), max_size=24
)


# -- placement ----------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(demands=demands_st, rooms=rooms_st)
def test_placement_never_overcommits_and_is_all_or_nothing(demands, rooms):
    try:
        chosen = place(demands, rooms)
    except InsufficientCapacity as err:
        assert err.status == 409 and f"{len(demands)} VMs" in err.detail
        return
    assert len(chosen) == len(demands)
    by_id = {r.node_id: r for r in rooms}
    for node_id, room in by_id.items():
        mine = [d for d, n in zip(demands, chosen, strict=True) if n == node_id]
        assert sum(d.vcpus for d in mine) <= room.vcpus
        assert sum(d.memory_mb for d in mine) <= room.memory_mb


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 40), nodes=st.integers(1, 6), slots=st.integers(1, 10))
def test_placement_spreads_a_burst_evenly(count, nodes, slots):
    """Identical VMs on identical nodes: counts differ by at most one; a burst that does not
    fit is refused whole."""
    rooms = [Room(f"n{i}", slots, slots * 256) for i in range(nodes)]
    demands = [Demand(1, 256)] * count
    if count > nodes * slots:
        with pytest.raises(InsufficientCapacity, match="do not fit"):
            place(demands, rooms)
        return
    counts = Counter(place(demands, rooms))
    spread = [counts.get(r.node_id, 0) for r in rooms]
    assert max(spread) - min(spread) <= 1


def test_placement_most_free_first_and_exclude():
    rooms = [Room("a", 2, 1024), Room("b", 8, 8192), Room("c", 4, 4096)]
    assert place([Demand(1, 128)] * 4, rooms) == ["b", "c", "a", "b"]
    assert place([Demand(1, 128)], rooms, exclude=["b"]) == ["c"]
    assert place([Demand(4, 128)] * 2, rooms) == ["b", "c"]  # a cannot take 4 vcpus
    with pytest.raises(InsufficientCapacity, match="a: 2 vcpus 1024 MB"):
        place([Demand(9, 128)], rooms)


# -- the state machine --------------------------------------------------------------------------
def test_vm_state_machine():
    path = [model.PENDING, model.CREATING, model.DEPLOYING, model.STARTING, model.RUNNING,
            model.DELETING, model.DELETED]  # fmt: skip
    for old, new in itertools.pairwise(path):
        model.check_transition(old, new)
    for retry_from in (model.CREATING, model.DEPLOYING, model.STARTING):
        model.check_transition(retry_from, model.PENDING)
    for bad in [(model.RUNNING, model.PENDING), (model.DELETED, model.DELETING),
                (model.PENDING, model.RUNNING), (model.ERROR, model.RUNNING)]:  # fmt: skip
        with pytest.raises(model.BadTransition):
            model.check_transition(*bad)


# -- Snooze bodies ------------------------------------------------------------------------------
def test_snooze_seed_template_maps_to_a_vm():
    (spec,) = snooze.start_request(json.loads(SEED_START))
    assert (spec.name, spec.image, spec.vcpus, spec.memory_mb) == (
        "debian1", "path_to_disk_image", 1, 196  # 200000 KiB, rounded up
    )  # fmt: skip
    assert spec.extra is not None and spec.extra["network"] == [12800.0, 12800.0]
    explicit = {"virtualMachineTemplates": [
        {"vcpus": 2, "memory": 131072, "imageId": "tiny", "name": "vm-a"}]}  # fmt: skip
    assert snooze.start_request(explicit)[0] == VMSpec(
        "vm-a", "tiny", 2, 128, {"memory_kib": 131072.0, "network": [0.0, 0.0], "xml": None}
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"virtualMachineTemplates": []}, "virtualMachineTemplates"),
        ({"virtualMachineTemplates": [{"name": "a"}]}, "virtualMachineTemplates[0]"),
        ({"virtualMachineTemplates": [{"vcpus": 0, "memory": 1, "imageId": "i", "name": "a"}]},
         "virtualMachineTemplates[0].vcpus"),
        ({"virtualMachineTemplates": [{"vcpus": 1, "memory": 1, "imageId": "../x", "name": "a"}]},
         "virtualMachineTemplates[0].imageId"),
        ({"virtualMachineTemplates": [{"libVirtTemplate": "<domain"}]},
         "virtualMachineTemplates[0].libVirtTemplate"),
        ({"virtualMachineTemplates": [{"libVirtTemplate":
          '<!DOCTYPE d [<!ENTITY x "y">]><domain><name>&x;</name></domain>'}]},
         "virtualMachineTemplates[0].libVirtTemplate"),
        ({"virtualMachineTemplates": [{"vcpus": 1, "memory": 1, "imageId": "i", "name": "a",
                                       "bogus": 1}]}, "virtualMachineTemplates[0]"),
    ],
)  # fmt: skip
def test_snooze_bad_bodies_name_the_field(body, field):
    with pytest.raises(InvalidInput) as err:
        snooze.start_request(body)
    assert err.value.field == field


def test_snooze_task_id_raw_or_json():
    tid = "a4fba1c6-4c8f-4691-a530-01c067e8deb2"
    assert snooze.task_id(tid.encode()) == tid
    assert snooze.task_id(json.dumps(tid).encode()) == tid
    with pytest.raises(InvalidInput):
        snooze.task_id(b"not-a-task")


def test_nodes_file_validation():
    assert parse_nodes([{"id": "n1", "url": "http://h:7774/RPC2", "vcpus": 2}])[0].vcpus == 2
    for bad, msg in [({}, "JSON list"), ([{"id": "n 1", "url": "u"}], "id must"),
                     ([{"id": "a", "url": "u"}, {"id": "a", "url": "u"}], "twice"),
                     ([{"id": "a"}], "url is required"),
                     ([{"id": "a", "url": "u", "vcpus": 0}], "vcpus")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_nodes(bad)


# -- the controller through volt-api ------------------------------------------------------------
class Rig:
    def __init__(self, tmp_path: Path, nodes: list[FakeNode], token: str | None = "admin"):
        self.nodes = {n.endpoint.id: n for n in nodes}
        self.capacity = CapacityCache(  # refreshed by the tests (refresh_all)
            [n.endpoint for n in nodes], lambda e: self.nodes[e.id].call("guest_host_info"), 1.0
        )
        self.store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
        self.controller = Controller(
            self.store,
            [n.endpoint for n in nodes],
            workers=4,
            client_factory=client_factory(self.nodes),
            controller_address=("127.0.0.1", 5001),
            capacity=self.capacity,
        )
        self.capacity.refresh_all()
        service = VoltService(self.store, load_executor("balanced"), node_timeout=60)
        self.app = VoltApp(service, auth_token=token, cluster=self.controller)
        self.token = token

    def call(self, method: str, url: str, body: Any = None, **kw: Any) -> tuple[int, Any, str]:
        kw.setdefault("token", self.token)
        return call(self.app, method, url, body, **kw)

    def wait_done(self, task: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            status, view, _ = self.call("GET", f"/v1/clusters/{task}")
            assert status == 200
            return view if view["status"] not in ("IN_PROGRESS", "DELETING") else None

        return wait_until(done, timeout_s=10, what=f"task {task}", max_interval_s=0.02)

    def close(self) -> None:
        self.controller.close()
        self.store.dispose()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, [FakeNode("n1", vcpus=2, memory_mb=1024), FakeNode("n2", 2, 1024)])
    yield r
    r.close()


BURST = {"image": "tiny", "count": 4, "flavor": {"vcpus": 1, "memory_mb": 128}}


def test_burst_spreads_runs_and_destroys(rig):
    status, answer, _ = rig.call("POST", "/v1/clusters", BURST)
    assert status == 202, answer
    view = rig.wait_done(answer["task"])
    assert view["status"] == "DONE"
    assert [vm["status"] for vm in view["vms"]] == ["RUNNING"] * 4
    assert Counter(vm["node"] for vm in view["vms"]) == {"n1": 2, "n2": 2}
    assert {vm["name"] for vm in view["vms"]} == {f"tiny-{i}" for i in range(4)}
    for node in rig.nodes.values():
        assert [g["state"] for g in node.guests.values()] == ["on", "on"]
        assert {g["image"] for g in node.guests.values()} == {"tiny"}
    status, nodes, _ = rig.call("GET", "/v1/nodes")
    assert status == 200
    assert [(n["id"], n["status"], n["used"], len(n["vms"])) for n in nodes] == [
        ("n1", "up", {"vcpus": 2, "memory_mb": 256}, 2),
        ("n2", "up", {"vcpus": 2, "memory_mb": 256}, 2),
    ]
    # full now: the next burst is refused up front, with the numbers, nothing recorded
    status, err, _ = rig.call("POST", "/v1/clusters", {**BURST, "count": 1})
    assert status == 409 and "n1: 0 vcpus 768 MB" in err["errors"][0]["detail"]
    assert len(rig.controller.records.all_vms()) == 4

    assert rig.call("DELETE", f"/v1/clusters/{answer['task']}")[0] == 202
    assert rig.wait_done(answer["task"])["status"] == "DELETED"
    assert all(not n.guests for n in rig.nodes.values())
    assert all(n["used"]["vcpus"] == 0 for n in rig.call("GET", "/v1/nodes")[1])


def test_a_vcenter_node_is_listed_with_its_backend_and_placed_on_as_a_kvm_node(tmp_path):
    nodes = [FakeNode("n1", 2, 1024), FakeNode("n2", 2, 1024, backend="vcenter"), FakeNode("n3")]
    nodes[2].fail = "*"
    r = Rig(tmp_path, nodes)
    try:
        status, listed, _ = r.call("GET", "/v1/nodes")
        assert status == 200
        assert [(n["id"], n["status"], n["backend"]) for n in listed] == [
            ("n1", "up", "libvirt"), ("n2", "up", "vcenter"), ("n3", "down", None)]  # fmt: skip
        status, answer, _ = r.call("POST", "/v1/clusters", BURST)
        assert status == 202, answer
        view = r.wait_done(answer["task"])
        assert view["status"] == "DONE"
        assert Counter(vm["node"] for vm in view["vms"]) == {"n1": 2, "n2": 2}
        assert [g["state"] for g in r.nodes["n2"].guests.values()] == ["on", "on"]
    finally:
        r.close()


def test_node_failure_mid_burst_retries_on_another_node(tmp_path):
    nodes = [FakeNode("n1", 4, 4096), FakeNode("n2", 4, 4096), FakeNode("n3", 1, 128)]
    r = Rig(tmp_path, nodes)
    try:
        nodes[0].fail = "guest_deploy"  # n1 takes the create, then fails every deploy
        status, answer, _ = r.call("POST", "/v1/clusters", {**BURST, "count": 3})
        assert status == 202
        view = r.wait_done(answer["task"])
        assert [vm["status"] for vm in view["vms"]] == ["RUNNING"] * 3
        assert all(vm["node"] != "n1" for vm in view["vms"])
        retried = [vm for vm in view["vms"] if vm["attempts"] == 2]
        assert [(vm["name"], vm["node"], vm["error"]) for vm in retried] == [("tiny-0", "n2", None)]
        assert Counter(vm["node"] for vm in view["vms"]) == {"n2": 2, "n3": 1}
        assert nodes[0].guests == {}  # its leftovers deleted
        # a VM whose retry fails too ends in ERROR with the reason; the task FAILED
        nodes[1].fail = nodes[2].fail = "guest_action"
        status, answer, _ = r.call("POST", "/v1/clusters", {**BURST, "count": 1})
        view = r.wait_done(answer["task"])
        assert view["status"] == "FAILED"
        (vm,) = view["vms"]
        assert vm["status"] == "ERROR" and vm["attempts"] == 2
        assert "guest_action start on" in vm["error"]
    finally:
        r.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**BURST, "count": 0}, "count"),
        ({**BURST, "count": "4"}, "count"),
        ({**BURST, "image": "a/b"}, "image"),
        ({**BURST, "flavor": {"vcpus": 1}}, "flavor"),
        ({**BURST, "flavor": {"vcpus": 0, "memory_mb": 128}}, "flavor.vcpus"),
        ({**BURST, "nodes": "n1"}, "nodes"),
        ({**BURST, "nodes": ["n9"]}, "nodes"),
        ({**BURST, "extra": 1}, "body"),
    ],
)
def test_bad_input_is_a_clear_400_and_changes_nothing(rig, body, field):
    status, err, _ = rig.call("POST", "/v1/clusters", body)
    assert status == 400
    assert f"invalid {field!r}" in err["errors"][0]["detail"]
    assert rig.controller.records.all_vms() == []
    assert all(n.calls.count("guest_create") == 0 for n in rig.nodes.values())


def test_routes_need_the_admin_and_unknown_tasks_are_404(rig):
    assert rig.call("POST", "/v1/clusters", BURST, token="wrong")[0] == 401
    assert rig.call("GET", "/v1/nodes", token="wrong")[0] == 401
    unknown = "a4fba1c6-4c8f-4691-a530-01c067e8deb2"
    assert rig.call("GET", f"/v1/clusters/{unknown}")[0] == 404
    assert rig.call("GET", "/v1/clusters/not-a-uuid")[0] == 400
    status, _, _ = rig.call("POST", "/groupmanager?getVirtualClusterResponse", raw=unknown.encode())
    assert status == 404
    assert rig.call("POST", "/groupmanager?noSuchMethod", raw=b"")[0] == 404


def _shape(value: Any) -> Any:
    """Keys (recursively) of a JSON document; lists by their first element."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value and isinstance(value[0], dict | list) else []
    return None


def _covers(ours: Any, theirs: Any) -> bool:
    if isinstance(theirs, dict):
        return isinstance(ours, dict) and all(
            k in ours and (not theirs[k] or _covers(ours[k], theirs[k])) for k in theirs
        )
    if isinstance(theirs, list) and theirs:
        return isinstance(ours, list) and bool(ours) and _covers(ours[0], theirs[0])
    return True


def test_snooze_routes_answer_the_seed_shapes(tmp_path):
    """The seed's three calls, as its curl lines send them (no token: Snooze has none, so
    volt-api runs noauth here; with token auth add X-Auth-Token)."""
    r = Rig(tmp_path, [FakeNode("n1", 2, 1024), FakeNode("n2", 2, 1024)], token=None)
    try:
        status, task, kind = r.call("POST", "/groupmanager?startVirtualCluster", raw=SEED_START)
        assert (status, kind) == (200, "text/plain") and snooze.task_id(task.encode()) == task
        raw = task.encode()  # curl -d "<task id>": a bare id, not JSON
        # empty until done, then the seed's shape
        first = r.call("POST", "/groupmanager?getVirtualClusterResponse", raw=raw)
        assert first[0] == 200 and (first[1] == "" or first[1]["errorCode"] is None)
        answer = wait_until(
            lambda: r.call("POST", "/groupmanager?getVirtualClusterResponse", raw=raw)[1] or None,
            timeout_s=10, what="the virtual cluster response", max_interval_s=0.02,
        )  # fmt: skip
        seed = json.loads((DATA / "snooze_virtual_cluster_response.json").read_text())
        assert _covers(_shape(answer), _shape(seed)), answer
        (vm,) = answer["virtualMachineMetaData"]
        assert vm["status"] == "RUNNING" and answer["errorCode"] is None
        assert vm["virtualMachineLocation"]["virtualMachineId"] == "debian1"
        assert vm["virtualMachineLocation"]["localControllerId"] in ("n1", "n2")
        assert vm["requestedCapacity"] == [1.0, 200000.0, 12800.0, 12800.0]
        assert vm["groupManagerControlDataAddress"] == {"address": "127.0.0.1", "port": 5001}
        assert "<name>debian1</name>" in vm["xmlRepresentation"]

        status, lcs, _ = r.call("GET", "/bootstrap?getLocalControllerList")
        seed = json.loads((DATA / "snooze_local_controller_list.json").read_text())
        assert status == 200 and _covers(_shape(lcs), _shape(seed)), lcs
        assert [lc["id"] for lc in lcs["localControllers"]] == ["n1", "n2"]
        assert lcs["localControllers"][0]["totalCapacity"] == [2.0, 1048576.0, 0.0, 0.0]
        assert sorted(len(lc["assignedVirtualMachines"]) for lc in lcs["localControllers"]) == [
            0, 1]  # fmt: skip
        # a bad start body: 400 naming the field, nothing recorded
        before = len(r.controller.records.all_vms())
        status, err, _ = r.call("POST", "/groupmanager?startVirtualCluster",
                                {"virtualMachineTemplates": [{"name": "x"}]})  # fmt: skip
        assert status == 400 and "virtualMachineTemplates[0]" in err["errors"][0]["detail"]
        assert len(r.controller.records.all_vms()) == before
    finally:
        r.close()


def test_a_node_list_restricts_the_burst_and_a_down_node_gets_nothing(rig):
    status, answer, _ = rig.call("POST", "/v1/clusters", {**BURST, "count": 2, "nodes": ["n2"]})
    assert status == 202
    view = rig.wait_done(answer["task"])
    assert [vm["node"] for vm in view["vms"]] == ["n2", "n2"]
    rig.nodes["n1"].fail = "*"  # down: no host info, no room
    rig.capacity.refresh_all()
    status, nodes, _ = rig.call("GET", "/v1/nodes")
    assert [(n["id"], n["status"], n["capacity"]) for n in nodes] == [
        ("n1", "down", None), ("n2", "up", {"vcpus": 2, "memory_mb": 1024})]  # fmt: skip
    status, err, _ = rig.call("POST", "/v1/clusters", {**BURST, "count": 1})
    assert status == 409 and "no node with room" in err["errors"][0]["detail"]


def _running(rig: Rig, count: int = 2) -> list[dict[str, Any]]:
    status, answer, _ = rig.call("POST", "/v1/clusters", {**BURST, "count": count})
    assert status == 202, answer
    vms: list[dict[str, Any]] = rig.wait_done(answer["task"])["vms"]
    return vms


def _guest(rig: Rig, vm: dict[str, Any]) -> dict[str, Any]:
    guest: dict[str, Any] = rig.nodes[vm["node"]].guests.get(vm["userid"], {})
    return guest


def _settled(rig: Rig, userid: str, power: str | None) -> dict[str, Any]:
    return wait_until(
        lambda: (v := rig.call("GET", f"/v1/vms/{userid}")[1])["power"] == power and v,
        timeout_s=10, what=f"{userid} {power}", max_interval_s=0.02,
    )  # fmt: skip


def test_per_vm_actions_reach_the_node_and_show_in_the_vm(rig):
    vm, other = _running(rig)
    url = f"/v1/vms/{vm['userid']}/action"
    for action, power, state in [
        ("suspend", "paused", "paused"), ("resume", "on", "on"), ("reboot", "on", "on"),
        ("shutdown", "off", "off"), ("start", "on", "on"),
    ]:  # fmt: skip
        node = rig.nodes[vm["node"]]
        calls = len(node.calls)
        status, answer, _ = rig.call("POST", url, {"action": action})
        assert status == 202 and answer["action"] == action, answer
        wait_until(lambda n=node, c=calls: n.calls[c:] == ["guest_action", "guest_power_state"],
                   timeout_s=10, what=action, max_interval_s=0.02)  # fmt: skip
        shown = _settled(rig, vm["userid"], power)
        assert shown["status"] == "RUNNING" and shown["error"] is None
        assert _guest(rig, vm)["state"] == state
    assert _guest(rig, other)["state"] == "on"  # the other VM untouched
    # destroy: gone from its node, DELETED, its room free again
    assert rig.call("POST", url, {"action": "destroy"})[0] == 202
    _settled(rig, vm["userid"], None)
    shown = wait_until(
        lambda: (v := rig.call("GET", f"/v1/vms/{vm['userid']}")[1])["status"] == "DELETED" and v,
        timeout_s=10, what="the destroy", max_interval_s=0.02,
    )  # fmt: skip
    assert _guest(rig, vm) == {} and shown["power"] is None
    status, err, _ = rig.call("POST", url, {"action": "reboot"})
    assert status == 409 and "is DELETED" in err["errors"][0]["detail"]


def test_a_failed_action_is_shown_on_the_vm(rig):
    (vm,) = _running(rig, 1)
    rig.nodes[vm["node"]].fail = "guest_action"
    assert rig.call("POST", f"/v1/vms/{vm['userid']}/action", {"action": "suspend"})[0] == 202
    shown = wait_until(
        lambda: (v := rig.call("GET", f"/v1/vms/{vm['userid']}")[1])["error"] and v,
        timeout_s=10, what="the failure", max_interval_s=0.02,
    )  # fmt: skip
    assert shown["error"] == f"suspend on {vm['node']}: {vm['node']} is down"
    assert shown["power"] == "on" and shown["status"] == "RUNNING"


def test_a_failed_destroy_names_the_node_and_reason_and_can_be_destroyed_again(rig):
    """A node that cannot delete its guest (say its libvirtd is restarting): that VM ends
    ERROR, its error naming the node and the node's answer whole, the task FAILED; once the
    node answers again a second DELETE finishes the job."""
    vms = _running(rig)
    task, bad = vms[0]["task"], vms[0]["node"]
    assert vms[1]["node"] != bad
    rig.nodes[bad].fail = "guest_delete"
    assert rig.call("DELETE", f"/v1/clusters/{task}")[0] == 202
    view = rig.wait_done(task)
    assert view["status"] == "FAILED", view
    assert [(vm["status"], vm["error"]) for vm in view["vms"]] == [
        ("ERROR", f"destroy on {bad}: {bad} is down"),
        ("DELETED", None),
    ]
    assert _guest(rig, vms[0]) != {}  # still there: the node did not delete it
    rig.nodes[bad].fail = None
    assert rig.call("DELETE", f"/v1/clusters/{task}")[0] == 202
    assert rig.wait_done(task)["status"] == "DELETED"
    assert _guest(rig, vms[0]) == {}


@pytest.mark.parametrize(
    ("url", "body", "status", "field"),
    [
        ("/v1/vms/VNOSUCH1/action", {"action": "reboot"}, 404, None),
        ("/v1/vms/nope!/action", {"action": "reboot"}, 400, "vm_id"),
        ("/v1/vms/{}/action", {"action": "explode"}, 400, "action"),
        ("/v1/vms/{}/action", {"action": 1}, 400, "action"),
        ("/v1/vms/{}/action", {"action": "reboot", "force": True}, 400, "body"),
        ("/v1/vms/{}/action", None, 400, "body"),
        ("/v1/vms/VNOSUCH1", None, 404, None),
    ],
)
def test_bad_actions_are_refused_and_nothing_is_dispatched(rig, url, body, status, field):
    (vm,) = _running(rig, 1)
    before = {n: list(node.calls) for n, node in rig.nodes.items()}
    method = "POST" if url.endswith("action") else "GET"
    got, err, _ = rig.call(method, url.format(vm["userid"]), body)
    assert got == status, err
    if field:
        assert f"invalid {field!r}" in err["errors"][0]["detail"]
    assert {n: list(node.calls) for n, node in rig.nodes.items()} == before
    assert rig.call("GET", f"/v1/vms/{vm['userid']}")[1]["power"] == "on"


def test_snooze_per_vm_verbs_use_the_same_actions(tmp_path):
    r = Rig(tmp_path, [FakeNode("n1", 2, 1024), FakeNode("n2", 2, 1024)], token=None)
    try:
        status, task, _ = r.call("POST", "/groupmanager?startVirtualCluster", raw=SEED_START)
        (vm,) = r.wait_done(task)["vms"]
        assert vm["name"] == "debian1"
        for where, verb, body, power in [
            ("/groupmanager", "suspendVirtualMachine", b"debian1", "paused"),  # curl -d debian1
            ("/groupmanager", "resumeVirtualMachine", b'"debian1"', "on"),
            ("/groupmanager", "shutdownVirtualMachine",
             json.dumps({"virtualMachineId": "debian1", "localControllerId": vm["node"]}).encode(),
             "off"),
            ("/bootstrap", "rebootVirtualMachine", vm["userid"].encode(), "on"),
        ]:  # fmt: skip
            status, answer, _ = r.call("POST", f"{where}?{verb}", raw=body)
            assert (status, answer) == (200, True), (verb, answer)
            _settled(r, vm["userid"], power)
            if power == "paused":
                answer = r.call("POST", "/groupmanager?getVirtualClusterResponse",
                                raw=task.encode())[1]  # fmt: skip
                assert answer["virtualMachineMetaData"][0]["status"] == "PAUSED"
        other = "n2" if vm["node"] == "n1" else "n1"
        where = json.dumps({"virtualMachineId": "debian1", "localControllerId": other}).encode()
        assert r.call("POST", "/groupmanager?destroyVirtualMachine", raw=where)[0] == 404
        assert r.call("POST", "/groupmanager?destroyVirtualMachine", raw=b"ghost")[0] == 404
        assert r.call("POST", "/bootstrap?getLocalControllerList", raw=b"debian1")[0] == 404
        status, err, _ = r.call("POST", "/groupmanager?destroyVirtualMachine", raw=b"a b")
        assert status == 400 and "'virtualMachineId'" in err["errors"][0]["detail"]
        # a second cluster with the same VM name: the bare name is ambiguous (409)
        _, task2, _ = r.call("POST", "/groupmanager?startVirtualCluster", raw=SEED_START)
        r.wait_done(task2)
        status, err, _ = r.call("POST", "/groupmanager?destroyVirtualMachine", raw=b"debian1")
        assert status == 409 and "send the userid" in err["errors"][0]["detail"]
        assert r.call("POST", "/groupmanager?destroyVirtualMachine",
                      raw=vm["userid"].encode())[0] == 200  # fmt: skip
        wait_until(
            lambda: r.call("GET", f"/v1/vms/{vm['userid']}")[1]["status"] == "DELETED",
            timeout_s=10, what="the destroy", max_interval_s=0.02,
        )  # fmt: skip
        assert r.call("POST", "/groupmanager?destroyVirtualMachine", raw=b"debian1")[0] == 200
    finally:
        r.close()


def test_a_burst_larger_than_the_cluster_is_refused_up_front_with_the_numbers(rig):
    status, err, _ = rig.call("POST", "/v1/clusters", {**BURST, "count": 5})
    assert status == 409
    assert err["errors"][0]["detail"] == (
        "5 VMs (5 vcpus, 640 MB) do not fit: VM #4 (1 vcpus, 128 MB) has no node with room; "
        "free before this burst: n1: 2 vcpus 1024 MB, n2: 2 vcpus 1024 MB"
    )
    assert rig.controller.records.all_vms() == []  # not half-started: nothing recorded
    assert all(n.calls == ["guest_host_info"] for n in rig.nodes.values())  # nor dispatched


def test_a_dead_node_does_not_slow_post_clusters(tmp_path):
    """The capacity cache asks in the background: a node that hangs (n3) or fails (n2)
    costs POST /v1/clusters nothing, gets no VM, and GET /v1/nodes says so."""
    fakes = {n.endpoint.id: n for n in (FakeNode("n1", 2, 1024), FakeNode("n2"), FakeNode("n3"))}
    fakes["n2"].fail = "*"
    release = threading.Event()

    def ask(endpoint: Any) -> Any:
        if endpoint.id == "n3":
            release.wait(10)  # hangs like a node that accepts and never answers
            raise TimeoutError("timed out")
        return fakes[endpoint.id].call("guest_host_info")

    endpoints = [n.endpoint for n in fakes.values()]
    store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
    controller = Controller(
        store, endpoints, client_factory=client_factory(fakes),
        capacity=CapacityCache(endpoints, ask, 0.05).start(),
    )  # fmt: skip
    app = VoltApp(VoltService(store, load_executor("balanced"), node_timeout=60),
                  auth_token="admin", cluster=controller)  # fmt: skip
    try:
        nodes = wait_until(
            lambda: (n := call(app, "GET", "/v1/nodes")[1])[1]["status"] == "down" and n,
            timeout_s=5, what="n2 down", max_interval_s=0.02,
        )  # fmt: skip
        assert [(n["id"], n["status"], n["stale"]) for n in nodes] == [
            ("n1", "up", False), ("n2", "down", False), ("n3", "unknown", False)]  # fmt: skip
        assert nodes[1]["error"] == "n2 is down" and nodes[2]["checked_s_ago"] is None
        t0 = time.monotonic()
        status, answer, _ = call(app, "POST", "/v1/clusters", {**BURST, "count": 2})
        took = time.monotonic() - t0
        assert status == 202 and took < 0.5, (status, took)
        vms = wait_until(
            lambda: (v := controller.vms(answer["task"])) and
            all(vm.status == "RUNNING" for vm in v) and v,
            timeout_s=10, what="the burst", max_interval_s=0.02,
        )  # fmt: skip
        assert [vm.node for vm in vms] == ["n1", "n1"]
        assert fakes["n2"].guests == fakes["n3"].guests == {}
    finally:
        release.set()
        controller.close()
        store.dispose()


def test_a_stale_entry_is_marked_and_skipped(tmp_path):
    now = [100.0]
    fakes = {n.endpoint.id: n for n in (FakeNode("n1", 2, 1024),)}
    endpoints = [n.endpoint for n in fakes.values()]
    cache = CapacityCache(
        endpoints, lambda e: fakes[e.id].call("guest_host_info"), 1.0, clock=lambda: now[0]
    )
    store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
    controller = Controller(store, endpoints, client_factory=client_factory(fakes), capacity=cache)
    try:
        cache.refresh_all()
        now[0] += 7.0  # = 2 x 1 s + INFO_TIMEOUT_S: still fresh
        (state,) = controller.node_states()
        assert (state["status"], state["stale"], state["checked_s_ago"]) == ("up", False, 7.0)
        now[0] += 0.5
        (state,) = controller.node_states()
        assert (state["status"], state["stale"]) == ("up", True)
        with pytest.raises(InsufficientCapacity, match="free before this burst: no nodes"):
            controller.submit([VMSpec("s-0", "tiny", 1, 128)], "v1")
        cache.refresh_all()
        controller.submit([VMSpec("s-0", "tiny", 1, 128)], "v1")
    finally:
        controller.close()
        store.dispose()
