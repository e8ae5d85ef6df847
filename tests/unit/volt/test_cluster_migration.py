"""Issue 13 item 5 through volt-api's RSGI app with fake nodes: ``POST /v1/vms/{id}/migrate``
and Snooze's ``migrateVirtualMachine`` check the destination (nothing dispatched on bad
input), prepare the destination, migrate from the source and record the new node; a failed
migration leaves the VM on its source and nothing on the destination."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brick.wait import wait_until
from tests.unit.volt.cluster_fakes import FakeNode
from tests.unit.volt.test_cluster import SEED_START, Rig, _running


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, [FakeNode("n1", 2, 1024), FakeNode("n2", 2, 1024), FakeNode("n3", 1, 64)])
    yield r
    r.close()


def _moved(rig: Rig, userid: str, state: str) -> dict[str, Any]:
    return wait_until(
        lambda: (v := rig.call("GET", f"/v1/vms/{userid}")[1])["migration"]["state"] == state
        and v,
        timeout_s=10, what=f"{userid}'s migration {state}", max_interval_s=0.02,
    )  # fmt: skip


def _other(vm: dict[str, Any]) -> str:
    return "n2" if vm["node"] == "n1" else "n1"


def test_migrate_moves_the_vm_and_records_the_bytes(rig):
    (vm,) = _running(rig, 1)
    source, target = vm["node"], _other(vm)
    url = f"/v1/vms/{vm['userid']}/migrate"
    status, answer, _ = rig.call("POST", url, {"destination": target})
    assert status == 202, answer
    assert (answer["from"], answer["to"]) == (source, target)
    shown = _moved(rig, vm["userid"], "done")
    assert shown["node"] == target and shown["status"] == "RUNNING" and shown["error"] is None
    assert shown["migration"]["disk_bytes"] == 16 << 20  # a string on XML-RPC: an int here
    assert shown["migration"]["memory_bytes"] == 90 << 20
    assert rig.nodes[target].guests[vm["userid"]]["state"] == "on"
    assert vm["userid"] not in rig.nodes[source].guests
    assert rig.nodes[target].calls[-2:] == ["guest_migrate_prepare", "guest_migrate_finish"]
    nodes = {n["id"]: n for n in rig.call("GET", "/v1/nodes")[1]}
    assert nodes[target]["vms"] == [vm["name"]] and nodes[source]["vms"] == []
    # per-VM actions now reach the new node
    assert rig.call("POST", f"/v1/vms/{vm['userid']}/action", {"action": "suspend"})[0] == 202
    wait_until(lambda: rig.nodes[target].guests[vm["userid"]]["state"] == "paused",
               timeout_s=10, what="suspend on the new node", max_interval_s=0.02)  # fmt: skip


def test_a_failed_migration_keeps_the_vm_on_its_source_and_nothing_on_the_destination(rig):
    (vm,) = _running(rig, 1)
    source, target = vm["node"], _other(vm)
    rig.nodes[source].fail = "guest_migrate"
    status, _, _ = rig.call("POST", f"/v1/vms/{vm['userid']}/migrate", {"destination": target})
    assert status == 202
    shown = _moved(rig, vm["userid"], "failed")
    assert shown["node"] == source and shown["status"] == "RUNNING"
    assert f"guest_migrate on {source}" in shown["error"]
    assert rig.nodes[target].calls[-2:] == ["guest_migrate_prepare", "guest_migrate_abort"]
    assert vm["userid"] not in rig.nodes[target].guests
    assert rig.nodes[source].guests[vm["userid"]]["state"] == "on"
    # the destination's room is free again, and a retry works
    assert all(
        n["used"]["vcpus"] == 0 for n in rig.call("GET", "/v1/nodes")[1] if n["id"] == target
    )
    rig.nodes[source].fail = None
    assert rig.call("POST", f"/v1/vms/{vm['userid']}/migrate", {"destination": target})[0] == 202
    assert _moved(rig, vm["userid"], "done")["node"] == target


@pytest.mark.parametrize(
    ("body", "status", "field", "detail"),
    [
        ({"destination": "n9"}, 400, "destination", "unknown node 'n9'"),
        ({"destination": "SELF"}, 400, "destination", "runs on"),
        ({"destination": "DOWN"}, 400, "destination", "is down"),
        ({"destination": "n3"}, 400, "destination", "has 1 vcpus 64 MB free"),
        ({"destination": 7}, 400, "destination", "must be a node id"),
        ({"destination": "../x"}, 400, "destination", "must be a node id"),
        ({"to": "n2"}, 400, "body", "destination"),
        (None, 400, "body", "destination"),
    ],
)
def test_bad_destinations_are_400_naming_the_field_and_nothing_is_dispatched(
    rig, body, status, field, detail
):
    (vm,) = _running(rig, 1)
    down = _other(vm)
    rig.nodes[down].fail = "guest_host_info"
    rig.capacity.refresh_all()
    if isinstance(body, dict) and body.get("destination") in ("SELF", "DOWN"):
        body = {"destination": vm["node"] if body["destination"] == "SELF" else down}
    before = {n: list(node.calls) for n, node in rig.nodes.items()}
    got, err, _ = rig.call("POST", f"/v1/vms/{vm['userid']}/migrate", body)
    assert got == status, err
    assert (
        f"invalid {field!r}" in err["errors"][0]["detail"] and detail in err["errors"][0]["detail"]
    )
    assert {n: list(node.calls) for n, node in rig.nodes.items()} == before
    assert rig.call("GET", f"/v1/vms/{vm['userid']}")[1]["migration"] is None


def test_unknown_vm_is_404_and_a_vm_not_on_is_409(rig):
    status, _, _ = rig.call("POST", "/v1/vms/VNOSUCH1/migrate", {"destination": "n2"})
    assert status == 404
    (vm,) = _running(rig, 1)
    assert rig.call("POST", f"/v1/vms/{vm['userid']}/action", {"action": "suspend"})[0] == 202
    wait_until(lambda: rig.call("GET", f"/v1/vms/{vm['userid']}")[1]["power"] == "paused",
               timeout_s=10, what="paused", max_interval_s=0.02)  # fmt: skip
    status, err, _ = rig.call(
        "POST", f"/v1/vms/{vm['userid']}/migrate", {"destination": _other(vm)}
    )
    assert status == 409 and "powered paused" in err["errors"][0]["detail"]


def test_a_migrating_vm_takes_no_other_action_and_holds_room_on_both_nodes(rig):
    (vm,) = _running(rig, 1)
    source, target = vm["node"], _other(vm)
    rig.nodes[source].lock.acquire()  # the source's guest_migrate waits
    try:
        assert (
            rig.call("POST", f"/v1/vms/{vm['userid']}/migrate", {"destination": target})[0] == 202
        )
        nodes = {n["id"]: n for n in rig.call("GET", "/v1/nodes")[1]}
        assert nodes[source]["used"]["vcpus"] == 1 and nodes[target]["used"]["vcpus"] == 1
        for url, body in [("action", {"action": "reboot"}), ("migrate", {"destination": target})]:
            status, err, _ = rig.call("POST", f"/v1/vms/{vm['userid']}/{url}", body)
            assert status == 409 and "migrating" in err["errors"][0]["detail"], err
    finally:
        rig.nodes[source].lock.release()
    assert _moved(rig, vm["userid"], "done")["node"] == target


def test_snooze_migrate_virtual_machine_uses_the_same_migration(tmp_path):
    r = Rig(tmp_path, [FakeNode("n1", 2, 1024), FakeNode("n2", 2, 1024)], token=None)
    try:
        _, task, _ = r.call("POST", "/groupmanager?startVirtualCluster", raw=SEED_START)
        (vm,) = r.wait_done(task)["vms"]
        target = _other(vm)
        where = {"virtualMachineId": "debian1", "localControllerId": vm["node"]}
        body = {"sourceVirtualMachineLocation": where,
                "destinationVirtualMachineLocation": {"virtualMachineId": "x",
                                                      "localControllerId": target},
                "destinationHypervisorSettings": {}, "migrated": False}  # fmt: skip
        status, answer, _ = r.call("POST", "/groupmanager?migrateVirtualMachine",
                                   raw=json.dumps(body).encode())  # fmt: skip
        assert (status, answer) == (200, True), answer
        assert _moved(r, vm["userid"], "done")["node"] == target
        located = r.call("POST", "/groupmanager?getVirtualClusterResponse", raw=task.encode())[1]
        assert located["virtualMachineMetaData"][0]["virtualMachineLocation"][
            "localControllerId"] == target  # fmt: skip
        stale = r.call("POST", "/groupmanager?migrateVirtualMachine", raw=json.dumps(body).encode())
        assert stale[0] == 404  # the source location names the node it left
        where = {"virtualMachineId": "debian1", "localControllerId": target}
        body = {**body, "sourceVirtualMachineLocation": where}
        for bad, field in [
            ({**body, "migrated": True}, "migrated"),
            ({**body, "destinationVirtualMachineLocation": {}},
             "destinationVirtualMachineLocation.localControllerId"),
            ({**body, "destinationVirtualMachineLocation": {"localControllerId": "nx"}},
             "destination"),
            ({"sourceVirtualMachineLocation": where}, "body"),
        ]:  # fmt: skip
            status, err, _ = r.call("POST", "/groupmanager?migrateVirtualMachine",
                                    raw=json.dumps(bad).encode())  # fmt: skip
            assert status == 400 and f"invalid {field!r}" in err["errors"][0]["detail"], err
        ghost = {**body, "sourceVirtualMachineLocation": {"virtualMachineId": "ghost"}}
        status, _, _ = r.call("POST", "/groupmanager?migrateVirtualMachine",
                              raw=json.dumps(ghost).encode())  # fmt: skip
        assert status == 404
    finally:
        r.close()
