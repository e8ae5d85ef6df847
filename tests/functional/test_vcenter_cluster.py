"""Issue 16, acceptance: bursts placed by the cluster API (a real volt-api) on a real
virtmanserver whose guests are VMs of govmomi's simulator (``guest_backend = vcenter``).

Real: volt-api and its controller, the virtmanserver (qemu driver, its tgtd), each guest's
VMThunder snapshot and its iSCSI export on the node's tgtd, every vSphere call of the VMs
(``CreateVM_Task`` with a SCSI controller, power, ``Destroy_Task``) and the simulator's
hosts as the node's capacity. Recorded, not done (``[vcenter] esx_host = recorded``): the
ESXi host's side of the disk (send target, rescan, the RDM's ``ReconfigVM_Task``): the
simulator has no iSCSI adapter and cannot hold an RDM disk. Each VM's recorded RDM is checked
against the node's real export of that guest's snapshot (portal, IQN, LUN, backing file).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from brick.tgt import TgtAdm
from brick.wait import wait_until
from tests.functional.vcsimproc import VCSim
from tests.functional.virtmanproc import VirtmanProcess
from tests.functional.voltproc import VoltProcess
from virtman.guest.vcenter import VCenterMachines, VCenterSettings

pytestmark = pytest.mark.functional

LAB = os.environ.get("VMT_TEST_LAB", "vmt")
COUNT = 10
BURST = {"image": "tiny", "count": COUNT, "flavor": {"vcpus": 1, "memory_mb": 64}}


@dataclass
class Rig:
    sim: VCSim
    node: VirtmanProcess
    volt: VoltProcess
    prefix: str  # the node's guest_name_prefix

    def vcenter(self, workdir: Path) -> VCenterMachines:
        """A session of the test's own, to read the simulator's inventory."""
        return VCenterMachines(
            VCenterSettings(
                host=self.sim.host, port=self.sim.port, scheme="http",
                username=self.sim.username, password=self.sim.password, generate_wsdl=True,
            ),
            state_dir=workdir,
        )  # fmt: skip

    def recorded(self) -> dict[str, Any]:
        path = self.node.state_dir / "vcenter-esx-host.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def disk_targets(self) -> dict[str, list[str]]:
        """The node's tgtd targets of guest disks: IQN -> backing files."""
        return {iqn: files for iqn, files in self.node.tgt_targets() if ":vmdisk-" in iqn}

    def burst(self) -> tuple[str, dict[str, Any], float]:
        """POST /v1/clusters, wait until it is no longer in progress: task, view, seconds."""
        t0 = time.monotonic()
        status, answer = self.volt.request("POST", "/v1/clusters", BURST)
        assert status == 202, answer
        task = answer["task"]
        view = wait_until(
            lambda: (v := self.volt.request("GET", f"/v1/clusters/{task}")[1])["status"]
            != "IN_PROGRESS" and v,
            timeout_s=40, what="the burst", max_interval_s=0.1,
        )  # fmt: skip
        return task, view, time.monotonic() - t0

    def destroy(self, task: str) -> float:
        t0 = time.monotonic()
        assert self.volt.request("DELETE", f"/v1/clusters/{task}")[0] == 202
        view = wait_until(
            lambda: (v := self.volt.request("GET", f"/v1/clusters/{task}")[1])["status"]
            != "DELETING" and v,
            timeout_s=30, what="the destroy", max_interval_s=0.1,
        )  # fmt: skip
        assert view["status"] == "DELETED", view
        return time.monotonic() - t0

    def assert_nothing_left(self, workdir: Path) -> None:
        client = self.node.client()
        assert client.call("guest_list") == []
        assert client.call("list") == []  # no snapshot
        assert self.disk_targets() == {}
        assert self.recorded()["rdms"] == {}
        with self.vcenter(workdir) as vms:
            assert vms.list() == []


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One simulator (its fault injection disarmed), one node, one volt-api for the module."""
    workdir = tmp_path_factory.mktemp("vcenter-cluster")
    (workdir / "sim").mkdir(parents=True)
    sim = VCSim(workdir / "sim", fail_create_every=4).start()
    prefix = f"{LAB}{os.getpid() % 100000}-"
    node = VirtmanProcess(
        workdir / "node",
        guest_backend="vcenter",
        guest_name_prefix=prefix,
        sections={
            "vcenter": {
                "host": sim.host, "port": sim.port, "scheme": "http",
                "username": sim.username, "password": sim.password,
                "generate_wsdl": "true", "task_poll_interval": 0.05, "esx_host": "recorded",
            }
        },
    )  # fmt: skip
    nodes_file = workdir / "nodes.json"
    nodes_file.write_text(json.dumps([{"id": "vc", "url": node.url, "token": node.token}]))
    (workdir / "volt").mkdir()
    volt = VoltProcess(
        workdir / "volt", cluster__nodes_file=nodes_file, cluster__capacity_interval=1
    )
    started = False
    try:
        node.start()
        started = True
        image = node.image_dir / "tiny.raw"
        image.write_bytes(os.urandom(1 << 20) * 4)
        assert node.client().call("create_image_target", "tiny", str(image)).startswith("0:")
        volt.start()
        yield Rig(sim, node, volt, prefix)
    finally:
        if volt.proc is not None:
            volt.stop()
        if node.proc is not None:
            _delete_guests(node)
            node.stop()
            if not started:  # killed before its shutdown path: its tgtd and qsd by pidfile
                node.reap()
        sim.stop()


def _delete_guests(node: VirtmanProcess) -> None:
    """Best effort after a failure: no guest outlives the test."""
    with contextlib.suppress(Exception):
        client = node.client(timeout=60)
        for userid in client.call("guest_list"):
            with contextlib.suppress(Exception):
                client.call("guest_delete", userid)


def _node_up(r: Rig) -> dict[str, Any]:
    def up() -> dict[str, Any] | None:
        status, listed = r.volt.request("GET", "/v1/nodes")
        assert status == 200, listed
        return listed[0] if listed[0]["status"] == "up" else None

    return wait_until(up, timeout_s=15, what="the vCenter node up", max_interval_s=0.1)


def _check_running(r: Rig, vm: dict[str, Any], hosts: set[str]) -> str:
    """A RUNNING VM of the burst: on a simulated host, powered on, its disk the RDM of the
    node's export of its own snapshot; the host's name."""
    client = r.node.client()
    userid = vm["userid"]
    instance = r.prefix + userid
    found = json.loads(client.call("guest_definition", userid))
    assert (found["instance"], found["state"]) == (instance, "running"), found
    assert found["host"] in hosts, found
    assert client.call("guest_power_state", userid) == "on"
    export = found["export"]
    assert export["lun"] == 1 and export["iqn"].endswith(f":vmdisk-{instance.lower()}")
    # the node's tgtd really exports this guest's snapshot under that IQN
    backing = r.disk_targets()[export["iqn"]]
    assert [Path(f).name for f in backing] == [f"{instance}.qcow2"]
    recorded = r.recorded()
    assert [export["host"], export["port"]] in recorded["send_targets"]
    rdm = recorded["rdms"][found["domain"]]
    assert (rdm["iqn"], rdm["lun"], rdm["mode"]) == (export["iqn"], 1, "physicalMode")
    assert rdm["mapping_file"].endswith(f"{found['domain']}/{found['domain']}-rdm.vmdk")
    return str(found["host"])


def test_burst_of_10_on_the_simulated_hosts_then_destroyed(rig: Rig, tmp_path: Path) -> None:
    started, r = time.monotonic(), rig
    node = _node_up(r)
    with r.vcenter(tmp_path) as vms:
        hosts = [h for h in vms.hosts() if h.connected]
    assert node["backend"] == "vcenter"
    assert node["capacity"] == {
        "vcpus": int(4 * sum(h.cpu_threads for h in hosts)),
        "memory_mb": sum(h.memory_mb for h in hosts),
    }
    assert len(hosts) == 3  # the simulator's cluster

    task, view, burst_s = r.burst()
    assert view["status"] == "DONE", view
    assert [vm["status"] for vm in view["vms"]] == ["RUNNING"] * COUNT
    on = [_check_running(r, vm, {h.name for h in hosts}) for vm in view["vms"]]
    with r.vcenter(tmp_path) as vms:
        listed = vms.list()
    assert sorted(i.instance for i in listed) == sorted(
        r.prefix + vm["userid"] for vm in view["vms"]
    )
    assert {i.state for i in listed} == {"running"}
    _, nodes = r.volt.request("GET", "/v1/nodes")
    assert nodes[0]["used"] == {"vcpus": COUNT, "memory_mb": 64 * COUNT}

    destroy_s = r.destroy(task)
    r.assert_nothing_left(tmp_path)
    print(
        f"\nvCenter burst: {COUNT} guests RUNNING in {burst_s:.1f} s (POST to DONE) on "
        f"{len(set(on))} of {len(hosts)} simulated hosts; destroyed in {destroy_s:.1f} s; "
        f"whole test {time.monotonic() - started:.1f} s"
    )


def test_a_task_fault_mid_burst_is_reported_and_cleaned_up(rig: Rig, tmp_path: Path) -> None:
    """The simulator fails every 4th ``CreateVM_Task`` as a task: guests 4 and 8 of the 10
    (in the order their creates reach it) are ERROR naming the fault, nothing of theirs is
    left on the node or in vCenter; the 8 others run; the destroy leaves nothing."""
    started, r = time.monotonic(), rig
    r.sim.faults(True)
    try:
        _node_up(r)
        with r.vcenter(tmp_path) as vms:
            hosts = {h.name for h in vms.hosts()}
        task, view, burst_s = r.burst()
        assert view["status"] == "FAILED", view
        failed = [vm for vm in view["vms"] if vm["status"] == "ERROR"]
        running = [vm for vm in view["vms"] if vm["status"] == "RUNNING"]
        assert (len(failed), len(running)) == (2, COUNT - 2), view
        for vm in failed:
            assert "guest_deploy on vc" in vm["error"], vm
            assert "CreateVM_Task" in vm["error"] and "InsufficientResourcesFault" in vm["error"]
        for vm in running:
            _check_running(r, vm, hosts)
        # the failed guests are gone everywhere: node record, snapshot, export, RDM, VM
        client = r.node.client()
        assert sorted(client.call("guest_list")) == sorted(vm["userid"] for vm in running)
        assert len(client.call("list")) == COUNT - 2
        assert len(r.disk_targets()) == len(r.recorded()["rdms"]) == COUNT - 2
        with r.vcenter(tmp_path) as vms:
            assert sorted(i.instance for i in vms.list()) == sorted(
                r.prefix + vm["userid"] for vm in running
            )

        destroy_s = r.destroy(task)
        r.assert_nothing_left(tmp_path)
    finally:
        r.sim.faults(False)
    print(
        f"\nvCenter burst with a task fault every 4th create: {len(failed)} of {COUNT} "
        f"reported and cleaned up, {len(running)} running, in {burst_s:.1f} s; destroyed in "
        f"{destroy_s:.1f} s; whole test {time.monotonic() - started:.1f} s"
    )


def test_a_restarted_node_exports_its_guests_disks_again(rig: Rig, tmp_path: Path) -> None:
    """virtmanserver stopped, one guest's target removed from its tgtd meanwhile (tgtd
    outlives the daemon and is adopted), started again: the guests are adopted, the lost disk
    exported again under the same IQN, the VMs untouched; then destroyed."""
    r = rig
    _node_up(r)
    status, answer = r.volt.request("POST", "/v1/clusters", {**BURST, "count": 2})
    assert status == 202, answer
    task = answer["task"]
    view = wait_until(
        lambda: (v := r.volt.request("GET", f"/v1/clusters/{task}")[1])["status"]
        != "IN_PROGRESS" and v,
        timeout_s=30, what="the burst", max_interval_s=0.1,
    )  # fmt: skip
    assert view["status"] == "DONE", view
    before = r.disk_targets()
    assert len(before) == 2

    assert r.node.proc is not None
    r.node.proc.send_signal(signal.SIGTERM)  # not node.stop(): that empties the node first
    assert r.node.proc.wait(timeout=60) == 0
    lost = sorted(before)[0]
    TgtAdm(r.node.tgt_control_port).delete_target(lost)
    assert lost not in r.disk_targets()
    r.node.start()
    assert r.disk_targets() == before  # same IQNs, same snapshots behind them
    hosts = {h.name for h in r.vcenter(tmp_path).hosts()}
    for vm in view["vms"]:
        _check_running(r, vm, hosts)
    assert r.node.client().call("guest_orphans") == []
    r.destroy(task)
    r.assert_nothing_left(tmp_path)
