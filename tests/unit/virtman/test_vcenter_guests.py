"""VCenterGuests (guest_backend = vcenter) against in-process fakes of vCenter, the node's
tgtd and Virtman; the ESXi host is the real RecordedHost (its JSON file)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.virtman.test_guests import FakeVirtman
from virtman.errors import GuestNotFound, GuestStateError, InstanceExists, InstanceNotFound
from virtman.guest.disk_export import DiskExports
from virtman.guest.vcenter import VCenterHost, VCenterTaskFailed, VCenterUnreachable, VCenterVMInfo
from virtman.guest.vcenter_guests import VCenterGuests
from virtman.guest.vcenter_rdm import LunNotVisible, RecordedHost
from virtman.journal import Journal
from virtman.layers.base import Revived

PREFIX = "guest-"
PORTAL = ("127.0.0.1", 3260)


class FakeMachines:
    """VCenterMachines' verbs on a dict; ``fail`` = {verb: exception} raised by that verb."""

    def __init__(self) -> None:
        self.vms: dict[str, dict[str, Any]] = {}
        self.closed = False
        self.fail: dict[str, Exception] = {}
        self.settings = SimpleNamespace(endpoint="https://vc.example:443")
        self.host_list = [
            VCenterHost("esx-1", 8, 65536, 1000, True),
            VCenterHost("esx-2", 8, 65536, 3000, True),
            VCenterHost("esx-3", 8, 65536, 0, False),
        ]

    def _check(self, verb: str) -> None:
        if verb in self.fail:
            raise self.fail[verb]

    def domain_name(self, instance: str) -> str:
        return f"vmt-{instance}"

    def boot(self, instance: str, *, vcpus: int, memory_mb: int, power_on: bool) -> Any:
        self._check("boot")
        if instance in self.vms:
            raise InstanceExists(instance)
        self.vms[instance] = {"state": "running" if power_on else "shutoff", "vcpus": vcpus}
        return self.info(instance)

    def info(self, instance: str) -> VCenterVMInfo:
        if instance not in self.vms:
            raise InstanceNotFound(instance)
        state = self.vms[instance]["state"]
        return VCenterVMInfo(
            instance, self.domain_name(instance), f"uuid-{instance}", state, "vm-1"
        )

    def host_of(self, instance: str) -> str:
        self.info(instance)
        return "esx-1"

    def rdm_change(self, instance: str, device: str) -> Any:
        self._check("rdm_change")
        name = self.domain_name(instance)
        backing = SimpleNamespace(
            deviceName=device, fileName=f"[ds] {name}/{name}-rdm.vmdk",
            compatibilityMode="physicalMode",
        )  # fmt: skip
        return SimpleNamespace(device=SimpleNamespace(backing=backing, controllerKey=1000,
                                                      unitNumber=0))  # fmt: skip

    def _set(self, instance: str, state: str) -> None:
        self.info(instance)
        self.vms[instance]["state"] = state

    def start(self, instance: str) -> None:
        self._set(instance, "running")

    def stop(self, instance: str) -> bool:
        self._set(instance, "shutoff")
        return True

    def suspend(self, instance: str) -> None:
        self._set(instance, "paused")

    def reset(self, instance: str) -> None:
        self._set(instance, "running")

    def destroy(self, instance: str) -> None:
        self._check("destroy")
        self.vms.pop(instance, None)

    def close(self) -> None:
        self.closed = True

    def hosts(self) -> list[VCenterHost]:
        return self.host_list

    def orphans(self, known: list[str]) -> list[VCenterVMInfo]:
        self._check("orphans")
        return [self.info(i) for i in sorted(self.vms) if i not in known]


class FakeTgt:
    """tgtadm's targets as a dict: iqn -> (backing, readonly)."""

    def __init__(self) -> None:
        self.targets: dict[str, tuple[str, bool]] = {}

    def create_target(self, iqn: str, path: str, *, lun: int, readonly: bool, chap: Any) -> int:
        assert lun == 1
        self.targets[iqn] = (path, readonly)
        return len(self.targets)

    def delete_target(self, iqn: str) -> None:
        self.targets.pop(iqn, None)

    def find(self, iqn: str) -> Any:
        return self.targets.get(iqn)


class Virtman(FakeVirtman):
    def __init__(self, journal: Journal, folder: Path, state_dir: Path) -> None:
        super().__init__(journal, folder)
        self.settings = SimpleNamespace(state_dir=state_dir)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "state"
        self.journal = Journal(self.state / "journal.json")
        (tmp_path / "instances").mkdir()
        self.virtman = Virtman(self.journal, tmp_path / "instances", self.state)
        self.machines = FakeMachines()
        self.tgt = FakeTgt()
        self.host_file = self.state / "esx.json"

    def guests(self, host: RecordedHost | None = None) -> VCenterGuests:
        return VCenterGuests(
            self.virtman,
            self.machines,  # type: ignore[arg-type]
            host or RecordedHost(self.host_file),
            DiskExports(self.tgt, None, "iqn.2010-10.org.openstack:", *PORTAL),  # type: ignore[arg-type]
            connections=lambda image: {"target_iqn": f"iqn.x:{image}"},
            name_prefix=PREFIX,
        )

    def recorded(self) -> dict[str, Any]:
        """The host's file as a restarted node reads it (none yet: nothing recorded)."""
        if not self.host_file.exists():
            return {"send_targets": [], "rdms": {}}
        return dict(json.loads(self.host_file.read_text()))


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_deploy_exports_the_snapshot_and_maps_it_into_a_new_vm(rig: Rig) -> None:
    guests = rig.guests()
    guests.create("g1", vcpus=2, memory_mb=256)
    guests.deploy("g1", "tiny")

    disk = str(rig.virtman.folder / "guest-G1.qcow2")
    iqn = "iqn.2010-10.org.openstack:vmdisk-guest-g1"
    assert rig.tgt.targets == {iqn: (disk, False)}  # read-write: the VM's disk
    assert rig.machines.vms == {"guest-G1": {"state": "shutoff", "vcpus": 2}}
    recorded = rig.recorded()
    assert recorded["send_targets"] == [list(PORTAL)]
    rdm = recorded["rdms"]["vmt-guest-G1"]
    assert (rdm["iqn"], rdm["lun"], rdm["mode"]) == (iqn, 1, "physicalMode")
    record = rig.journal.records("guests")["G1"]
    assert (record["disk"], record["vm"], record["deploying"]) == (disk, "vmt-guest-G1", None)
    assert record["export"] == {"host": PORTAL[0], "port": PORTAL[1], "iqn": iqn, "lun": 1}

    assert guests.power_state("g1") == "off"
    guests.start("g1")
    assert guests.power_state("g1") == "on"
    assert guests.info("g1")["mem_kb"] == 256 * 1024
    found = json.loads(guests.definition("g1"))
    assert (found["host"], found["state"], found["export"]["iqn"]) == ("esx-1", "running", iqn)
    with pytest.raises(GuestStateError, match="deployed already"):
        guests.deploy("g1", "tiny")


@pytest.mark.parametrize(
    ("step", "error"),
    [
        ("boot", VCenterTaskFailed("CreateVM_Task", "vmt-guest-G1", "InsufficientResourcesFault")),
        ("rdm_change", VCenterUnreachable("https://vc.example:443", "gone")),
    ],
)
def test_a_failed_deploy_step_leaves_nothing(rig: Rig, step: str, error: Exception) -> None:
    guests = rig.guests()
    guests.create("g1", vcpus=1, memory_mb=64)
    rig.machines.fail[step] = error
    with pytest.raises(type(error)):
        guests.deploy("g1", "tiny")
    assert rig.machines.vms == {} and rig.tgt.targets == {}
    assert rig.virtman.list() == []  # the snapshot released
    assert rig.recorded()["rdms"] == {}
    record = rig.journal.records("guests")["G1"]
    assert (record["disk"], record["deploying"]) == (None, None)
    del rig.machines.fail[step]
    guests.deploy("g1", "tiny")  # and it can be deployed again
    assert list(rig.machines.vms) == ["guest-G1"]


def test_a_lun_the_host_does_not_see_fails_the_deploy_and_destroys_the_vm(rig: Rig) -> None:
    class Blind(RecordedHost):
        def device_of(self, iqn: str, lun: int) -> str | None:
            return None

    guests = rig.guests(Blind(rig.host_file))
    guests.create("g1", vcpus=1, memory_mb=64)
    with pytest.raises(LunNotVisible, match=r"vmdisk-guest-g1 lun 1 after adding 127\.0\.0\.1:"):
        guests.deploy("g1", "tiny")
    assert rig.machines.vms == {} and rig.tgt.targets == {} and rig.virtman.list() == []


def test_the_disk_is_attached_on_the_storage_of_the_new_vms_host(rig: Rig) -> None:
    asked: list[tuple[str, list[str]]] = []

    class PerVm(RecordedHost):
        def storage_for(self, vm_name: str) -> RecordedHost:
            asked.append((vm_name, sorted(rig.machines.vms)))
            return super().storage_for(vm_name)

    guests = rig.guests(PerVm(rig.host_file))
    guests.create("g1", vcpus=1, memory_mb=64)
    guests.deploy("g1", "tiny")
    assert asked == [("vmt-guest-G1", ["guest-G1"])]  # asked once its VM exists (placed)


def test_delete_removes_everything_and_an_unreachable_vcenter_keeps_the_record(rig: Rig) -> None:
    guests = rig.guests()
    guests.create("g1", vcpus=1, memory_mb=64)
    guests.deploy("g1", "tiny")
    rig.machines.fail["destroy"] = VCenterUnreachable("https://vc.example:443", "refused")
    with pytest.raises(VCenterUnreachable):
        guests.delete("g1")
    assert guests.list() == ["G1"] and rig.tgt.targets  # nothing lost: delete again later
    del rig.machines.fail["destroy"]
    guests.delete("g1")
    assert guests.list() == [] and rig.machines.vms == {} and rig.tgt.targets == {}
    assert rig.virtman.list() == [] and rig.recorded()["rdms"] == {}
    with pytest.raises(GuestNotFound):
        guests.delete("g1")
    guests.close()
    assert rig.machines.closed


def test_power_verbs_follow_the_vm(rig: Rig) -> None:
    guests = rig.guests()
    guests.create("g1", vcpus=1, memory_mb=64)
    with pytest.raises(GuestStateError, match="no disk deployed"):
        guests.start("g1")
    guests.deploy("g1", "tiny")
    with pytest.raises(GuestStateError, match="cannot pause: it is not on"):
        guests.pause("g1")
    guests.start("g1")
    guests.pause("g1")
    assert guests.power_state("g1") == "paused"
    guests.unpause("g1")
    guests.reboot("g1")
    assert guests.power_state("g1") == "on"
    guests.softstop("g1", timeout_s=1)
    assert guests.power_state("g1") == "off"
    assert rig.journal.records("guests")["G1"]["state"] == "off"
    rig.machines.vms.clear()  # destroyed behind our back
    with pytest.raises(GuestStateError, match="gone from vCenter"):
        guests.start("g1")
    with pytest.raises(GuestStateError, match="capture is not on the vcenter backend"):
        guests.capture("g1", "snap")


def test_host_info_is_the_connected_hosts_capacity(rig: Rig) -> None:
    guests = rig.guests()
    for userid in ("g1", "g2"):
        guests.create(userid, vcpus=3, memory_mb=64)
        guests.deploy(userid, "tiny")
    guests.start("g1")
    info = guests.host_info()
    assert (info["backend"], info["hypervisor_type"]) == ("vcenter", "vcenter")
    assert info["vcpus"] == 4 * 16  # two connected hosts of 8 threads, ratio 4
    assert (info["memory_mb"], info["memory_mb_used"]) == (2 * 65536, 4000)
    assert info["vcpus_used"] == 3  # g1 is on, g2 off
    assert info["cpu_info"]["hosts"] == ["esx-1", "esx-2"]


def test_adopt_undoes_an_interrupted_deploy_exports_again_and_lists_orphans(rig: Rig) -> None:
    guests = rig.guests()
    for userid in ("g1", "g2"):
        guests.create(userid, vcpus=1, memory_mb=64)
        guests.deploy(userid, "tiny")
    # a crash in g2's deploy (recorded as deploying, VM made), tgtd lost g1's target,
    # and a VM of ours nobody recorded
    record = rig.journal.records("guests")["G2"]
    rig.journal.put("guests", "G2", {**record, "disk": None, "deploying": "tiny"})
    rig.tgt.targets.clear()
    rig.machines.vms["guest-LOST"] = {"state": "running", "vcpus": 1}

    restarted = rig.guests()  # a new process: the recorded host reads its file
    restarted.adopt()
    assert list(rig.tgt.targets) == ["iqn.2010-10.org.openstack:vmdisk-guest-g1"]
    assert sorted(rig.machines.vms) == ["guest-G1", "guest-LOST"]
    assert list(rig.recorded()["rdms"]) == ["vmt-guest-G1"]
    assert rig.journal.records("guests")["G2"]["deploying"] is None
    assert restarted.orphans() == ["guest-LOST"]
    assert "guest-LOST" in rig.machines.vms  # reported, never destroyed


def test_disks_are_exported_again_when_tgtd_lost_them(rig: Rig) -> None:
    guests = rig.guests()
    for userid in ("g1", "g2"):
        guests.create(userid, vcpus=1, memory_mb=64)
    guests.deploy("g1", "tiny")
    exported = dict(rig.tgt.targets)
    rig.tgt.targets.clear()  # tgtd died and was started again
    assert guests.restore_exports(Revived(stacks=True)) == 0  # its targets were not lost
    assert guests.restore_exports(Revived(targets=True)) == 1  # g1 only: g2 has no disk
    assert rig.tgt.targets == exported
    assert guests.restore_exports(Revived(targets=True)) == 0


def test_disk_exports_name_targets_in_lower_case_apart_from_images() -> None:
    tgt = FakeTgt()
    exports = DiskExports(tgt, None, "iqn.2010-10.org.openstack:", "10.0.0.5", 3260)  # type: ignore[arg-type]
    export = exports.export("guest-AB12", "/var/lib/virtman/instances/guest-AB12.qcow2")
    assert (export.host, export.port, export.lun) == ("10.0.0.5", 3260, 1)
    assert export.iqn == "iqn.2010-10.org.openstack:vmdisk-guest-ab12"
    assert exports.exported("guest-AB12")
    exports.remove("guest-AB12")
    exports.remove("guest-AB12")  # gone already: no error
    assert tgt.targets == {} and not exports.exported("guest-AB12")


@pytest.fixture
def vcenter_conf() -> Iterator[Any]:
    from virtman.conf import CONF

    yield CONF
    CONF.clear_override("driver")
    CONF.clear_override("esx_host", group="vcenter")
    for name in ("host", "port", "scheme", "username", "password", "generate_wsdl"):
        CONF.clear_override(name, group="vcenter")


def test_the_node_refuses_a_vcenter_backend_it_cannot_use(
    vcenter_conf: Any, tmp_path: Path
) -> None:
    from virtman.cmd.server import build_vcenter_guests

    assert vcenter_conf.guest_backend == "libvirt"  # the default is unchanged
    settings = SimpleNamespace(state_dir=tmp_path)
    with pytest.raises(SystemExit, match=r"needs \[vcenter\] esx_host"):
        build_vcenter_guests(None, settings)  # type: ignore[arg-type]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        overrides = {"host": "127.0.0.1", "port": port, "scheme": "http",
                     "username": "vmt", "password": "secret", "generate_wsdl": True}  # fmt: skip
        for name, value in overrides.items():
            vcenter_conf.set_override(name, value, group="vcenter")
        vcenter_conf.set_override("esx_host", "vsphere", group="vcenter")
        with pytest.raises(SystemExit, match="esx_host = vsphere needs driver = dm: the qemu"):
            build_vcenter_guests(None, settings)  # type: ignore[arg-type]
        vcenter_conf.set_override("driver", "dm")
        for esx_host in ("recorded", "vsphere"):  # both accepted: vCenter is tried next
            vcenter_conf.set_override("esx_host", esx_host, group="vcenter")
            with pytest.raises(SystemExit, match=rf"\[vcenter\]: vCenter at "
                               rf"http://127.0.0.1:{port} unreachable"):  # fmt: skip
                build_vcenter_guests(None, settings)  # type: ignore[arg-type]
