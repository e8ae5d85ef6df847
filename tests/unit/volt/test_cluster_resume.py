"""A cluster controller that starts again takes up what its previous run left in the middle
(volt-api killed during a burst, a destroy or a migration): the store's rows as that run
left them, fake nodes as it left them, and a new controller over the same store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brick.wait import wait_until
from tests.unit.volt.cluster_fakes import FakeNode
from tests.unit.volt.test_cluster import Rig
from volt.cluster import controller as controller_module
from volt.cluster import migration, model
from volt.cluster.model import Records, VMSpec
from volt.store import Store

# the id of Rig's controller (it listens on 127.0.0.1:5001)
OWNER = str(uuid.uuid5(uuid.NAMESPACE_URL, "volt:127.0.0.1:5001"))
SPEC = VMSpec(name="vm", image="tiny", vcpus=1, memory_mb=128)


@pytest.fixture
def nodes() -> list[FakeNode]:
    return [FakeNode("n1", 2, 1024), FakeNode("n2", 2, 1024)]


def left_by_a_previous_run(
    tmp_path: Path, statuses: list[tuple[str, str]], owner: str = OWNER, **extra: Any
) -> list[str]:
    """Rows as a killed controller left them: one VM per (node, status); their userids."""
    store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
    records = Records(store, owner=owner)
    userids = [f"VRESUME{i}" for i in range(len(statuses))]
    records.create("task-1", "v1", [SPEC] * len(statuses), [n for n, _ in statuses], userids)
    path = {
        model.CREATING: [],
        model.DEPLOYING: [model.CREATING],
        model.STARTING: [model.CREATING, model.DEPLOYING],
        model.RUNNING: [model.CREATING, model.DEPLOYING, model.STARTING],
        model.DELETING: [model.CREATING, model.DEPLOYING, model.STARTING, model.RUNNING],
    }
    for userid, (_, status) in zip(userids, statuses, strict=True):
        if status == model.PENDING:
            continue
        vm = records.vm(userid)
        for step in [*path[status], status]:
            vm = records.update(vm, step)
        if extra:
            records.note(vm, extra=extra)
    store.dispose()
    return userids


def status_of(rig: Rig, userid: str) -> dict[str, Any]:
    status, view, _ = rig.call("GET", f"/v1/vms/{userid}")
    assert status == 200, view
    return dict(view)


@pytest.fixture
def restarted(tmp_path: Path, nodes: list[FakeNode]) -> Iterator[Any]:
    rigs: list[Rig] = []

    def start() -> Rig:
        rigs.append(Rig(tmp_path, nodes))
        return rigs[-1]

    yield start
    for rig in rigs:
        rig.close()


def test_a_burst_cut_in_its_middle_is_brought_up_and_a_destroy_is_sent_again(
    tmp_path, nodes, restarted
):
    n1, n2 = nodes
    pending, creating, deploying, deleting = left_by_a_previous_run(
        tmp_path,
        [("n1", model.PENDING), ("n1", model.CREATING), ("n2", model.DEPLOYING),
         ("n2", model.DELETING)],
    )  # fmt: skip
    n1.guests[creating] = {"state": "off", "vcpus": 1, "memory_mb": 128}  # half made
    n2.guests[deploying] = {"state": "off", "vcpus": 1, "memory_mb": 128, "image": "tiny"}
    n2.guests[deleting] = {"state": "on", "vcpus": 1, "memory_mb": 128, "image": "tiny"}
    rig = restarted()
    for userid in (pending, creating, deploying):
        wait_until(lambda u=userid: status_of(rig, u)["status"] == "RUNNING", timeout_s=10,
                   what=f"{userid} running", max_interval_s=0.02)  # fmt: skip
    wait_until(lambda: status_of(rig, deleting)["status"] == "DELETED", timeout_s=10,
               what="the destroy sent again", max_interval_s=0.02)  # fmt: skip
    assert n1.guests[pending]["state"] == n1.guests[creating]["state"] == "on"
    assert n2.guests[deploying] == {"state": "on", "vcpus": 1, "memory_mb": 128, "image": "tiny"}
    assert deleting not in n2.guests
    # the half-made guests were deleted, then made again from the start
    assert n1.calls.count("guest_delete") == 1 and n1.calls.count("guest_create") == 2
    assert n2.calls.count("guest_delete") == 2 and n2.calls.count("guest_create") == 1


def moving_vm(tmp_path: Path) -> str:
    moving = {"state": migration.MIGRATING, "from": "n1", "to": "n2"}
    (userid,) = left_by_a_previous_run(tmp_path, [("n1", model.RUNNING)], migration=moving)
    return userid


def test_a_migration_that_had_moved_the_guest_is_finished_on_the_destination(
    tmp_path, nodes, restarted
):
    _, n2 = nodes
    userid = moving_vm(tmp_path)
    n2.guests[userid] = {"state": "paused", "vcpus": 1, "memory_mb": 128}  # arrived
    rig = restarted()
    shown = wait_until(
        lambda: (v := status_of(rig, userid))["migration"]["state"] == "done" and v,
        timeout_s=10, what="the migration settled", max_interval_s=0.02,
    )  # fmt: skip
    assert shown["node"] == "n2" and shown["status"] == "RUNNING" and shown["error"] is None
    assert n2.guests[userid]["state"] == "on" and "guest_migrate_finish" in n2.calls


def test_a_migration_that_never_moved_the_guest_is_undone_and_it_stays(tmp_path, nodes, restarted):
    n1, n2 = nodes
    userid = moving_vm(tmp_path)
    n1.guests[userid] = {"state": "on", "vcpus": 1, "memory_mb": 128}
    n2.guests[userid] = {"state": "incoming", "vcpus": 1, "memory_mb": 128}  # prepared only
    rig = restarted()
    shown = wait_until(
        lambda: (v := status_of(rig, userid))["migration"]["state"] == "failed" and v,
        timeout_s=10, what="the migration settled", max_interval_s=0.02,
    )  # fmt: skip
    assert shown["node"] == "n1" and shown["status"] == "RUNNING"
    assert shown["error"] == "volt-api restarted during the migration; the guest stays on n1"
    assert userid not in n2.guests and "guest_migrate_abort" in n2.calls
    assert n1.guests[userid]["state"] == "on"


def test_a_migration_still_running_is_waited_for(tmp_path, nodes, restarted, monkeypatch):
    monkeypatch.setattr(controller_module, "SETTLE_INTERVAL_S", 0.05)
    n1, n2 = nodes
    userid = moving_vm(tmp_path)
    n1.guests[userid] = {"state": "on", "vcpus": 1, "memory_mb": 128}
    n2.guests[userid] = {"state": "paused", "vcpus": 1, "memory_mb": 128}  # libvirt's job runs
    n2.fail = "guest_power_state"  # and the destination does not answer at first
    rig = restarted()
    wait_until(lambda: n2.calls.count("guest_power_state") >= 2, timeout_s=10,
               what="asked again", max_interval_s=0.02)  # fmt: skip
    n2.fail = None
    wait_until(lambda: n2.calls.count("guest_power_state") >= 4, timeout_s=10,
               what="asked again", max_interval_s=0.02)  # fmt: skip
    assert status_of(rig, userid)["migration"]["state"] == "migrating"  # nothing decided
    with n1.lock:  # the job ends: libvirt moved it, the source released it
        del n1.guests[userid]
    shown = wait_until(
        lambda: (v := status_of(rig, userid))["migration"]["state"] == "done" and v,
        timeout_s=10, what="the migration settled", max_interval_s=0.02,
    )  # fmt: skip
    assert shown["node"] == "n2" and n2.guests[userid]["state"] == "on"


def test_only_the_rows_a_controller_changed_last_are_its_own(tmp_path):
    left_by_a_previous_run(tmp_path, [("n1", model.PENDING)], owner="other")
    store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
    try:
        records = Records(store, owner=OWNER)
        assert [vm.userid for vm in records.unfinished("other")] == ["VRESUME0"]
        assert records.unfinished(OWNER) == []
        records.update(records.vm("VRESUME0"), model.CREATING)  # changed by OWNER now
        assert [vm.userid for vm in records.unfinished(OWNER)] == ["VRESUME0"]
        assert records.unfinished("other") == []
    finally:
        store.dispose()


@pytest.mark.parametrize(
    ("source", "target", "where"),
    [
        (migration.GONE, "on", "moved"),
        (migration.GONE, migration.GONE, "moved"),  # finish then fails: recorded there
        ("on", "off", "stayed"),
        ("on", migration.GONE, "stayed"),
        ("off", "off", "stayed"),
        ("on", "paused", None),
        ("off", "on", None),  # libvirt moved it; the source has not released it yet
    ],
)
def test_settled(source, target, where):
    assert migration.settled(source, target) == where


def test_a_burst_posted_at_start_is_not_taken_for_unfinished_work(tmp_path, nodes, restarted):
    # The unfinished rows are found before the controller takes any request: a burst
    # recorded meanwhile was brought up twice (its VMs ended in ERROR or Conflict).
    (left,) = left_by_a_previous_run(tmp_path, [("n1", model.PENDING)])
    rig = restarted()
    status, answer, _ = rig.call(
        "POST",
        "/v1/clusters",
        {"image": "tiny", "count": 3, "flavor": {"vcpus": 1, "memory_mb": 128}},
    )
    assert status == 202, answer
    view = rig.wait_done(answer["task"])
    assert [vm["status"] for vm in view["vms"]] == ["RUNNING"] * 3
    wait_until(lambda: status_of(rig, left)["status"] == "RUNNING", timeout_s=10,
               what="the left VM", max_interval_s=0.02)  # fmt: skip
    created = sum(n.calls.count("guest_create") for n in nodes)
    assert created == 4  # each VM once


def test_no_such_guest_is_read_from_the_typed_answer_of_either_transport() -> None:
    """A missing guest is the node's fault 404 (XML-RPC) or GuestNotFound (bus), never a
    message that merely says "does not exist"."""
    import oslo_messaging

    from tests.unit.volt.cluster_fakes import not_found

    assert controller_module.no_such_guest(not_found("guest_delete", "VM1"))
    over_bus = oslo_messaging.RemoteError("GuestNotFound", "Virtman: the guest 'VM1' ...", "")
    assert controller_module.no_such_guest(over_bus)
    assert not controller_module.no_such_guest(RuntimeError("guest VM1 does not exist"))
    other = oslo_messaging.RemoteError("InvalidInput", "the image does not exist", "")
    assert not controller_module.no_such_guest(other)


def test_running_vms_are_read_as_unfinished_only_with_a_migration_on_record(tmp_path):
    left_by_a_previous_run(tmp_path, [("n1", model.RUNNING), ("n2", model.RUNNING)])
    store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
    try:
        records = Records(store, owner=OWNER)
        assert records.unfinished(OWNER) == []  # running, never moved: not read at all
        moved = {"migration": {"state": migration.MIGRATING, "from": "n1", "to": "n2"}}
        records.note(records.vm("VRESUME1"), extra=moved)
        records.note(records.vm("VRESUME0"), extra={"power": "on"})
        found = records.unfinished(OWNER)
        assert [vm.userid for vm in found] == ["VRESUME1"]
        assert migration.migrating(found[0])
    finally:
        store.dispose()
