"""The RDM disk's host-side steps against an in-process fake ESXi storage system."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from virtman.guest.domains import InvalidVMInput
from virtman.guest.vcenter_rdm import (
    IscsiExport,
    LunNotVisible,
    RecordedHost,
    attach,
    rdm_disk_change,
)

IQN = "iqn.2010-10.org.openstack:volume-snap-a"
EXPORT = IscsiExport("127.0.0.1", 3260, IQN, 1)


class FakeHostStorage:
    """An ESXi host: a LUN shows up on rescan only if its portal was added."""

    def __init__(self, targets: dict[tuple[str, int], dict[tuple[str, int], str]]) -> None:
        self.targets = targets  # portal -> (iqn, lun) -> device name
        self.portals: list[tuple[str, int]] = []
        self.seen: dict[tuple[str, int], str] = {}
        self.calls: list[str] = []

    def add_send_target(self, host: str, port: int) -> None:
        self.calls.append(f"AddInternetScsiSendTargets {host}:{port}")
        self.portals.append((host, port))

    def rescan(self) -> None:
        self.calls.append("RescanAllHba")
        for portal in self.portals:
            self.seen.update(self.targets.get(portal, {}))

    def device_of(self, iqn: str, lun: int) -> str | None:
        return self.seen.get((iqn, lun))


class Factory:
    def create(self, kind: str) -> Any:
        return SimpleNamespace(kind=kind.removeprefix("ns0:"))


def test_attach_adds_portal_rescans_and_names_device() -> None:
    host = FakeHostStorage({("127.0.0.1", 3260): {(IQN, 1): "/vmfs/devices/disks/naa.1"}})
    assert attach(host, EXPORT) == "/vmfs/devices/disks/naa.1"
    assert host.calls == ["AddInternetScsiSendTargets 127.0.0.1:3260", "RescanAllHba"]


def test_attach_seen_lun_needs_no_rescan() -> None:
    host = FakeHostStorage({})
    host.seen[(IQN, 1)] = "/vmfs/devices/disks/naa.1"
    assert attach(host, EXPORT) == "/vmfs/devices/disks/naa.1"
    assert host.calls == []


def test_attach_wrong_lun_is_an_error_naming_it() -> None:
    host = FakeHostStorage({("127.0.0.1", 3260): {(IQN, 2): "/vmfs/devices/disks/naa.2"}})
    with pytest.raises(LunNotVisible, match=f"{IQN} lun 1 after adding 127.0.0.1:3260"):
        attach(host, EXPORT)


@pytest.mark.parametrize(
    ("field", "args"),
    [
        ("portal host", ("node-a", 3260, IQN, 1)),
        ("portal port", ("127.0.0.1", 0, IQN, 1)),
        ("iqn", ("127.0.0.1", 3260, "volume-a", 1)),
        ("lun", ("127.0.0.1", 3260, IQN, -1)),
        ("lun", ("127.0.0.1", 3260, IQN, True)),
    ],
)
def test_export_bad_field_is_named(field: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidVMInput) as err:
        IscsiExport(*args)
    assert err.value.field == field


def test_rdm_disk_change_backs_disk_with_device() -> None:
    change = rdm_disk_change(
        Factory(), "/vmfs/devices/disks/naa.1", "[ds] vmt-a/vmt-a-rdm.vmdk", controller_key=1000
    )
    assert (change.kind, change.operation, change.fileOperation) == (
        "VirtualDeviceConfigSpec", "add", "create",
    )  # fmt: skip
    disk = change.device
    assert (disk.kind, disk.controllerKey, disk.unitNumber) == ("VirtualDisk", 1000, 0)
    backing = disk.backing
    assert backing.kind == "VirtualDiskRawDiskMappingVer1BackingInfo"
    assert (backing.deviceName, backing.compatibilityMode, backing.fileName) == (
        "/vmfs/devices/disks/naa.1", "physicalMode", "[ds] vmt-a/vmt-a-rdm.vmdk",
    )  # fmt: skip


def test_recorded_host_sees_a_lun_after_a_rescan_and_keeps_its_record(tmp_path: Path) -> None:
    path = tmp_path / "esx.json"
    host = RecordedHost(path)
    assert host.device_of(IQN, 1) is None  # no portal rescanned yet
    device = attach(host, EXPORT)
    assert device.startswith("/vmfs/devices/disks/naa.6") and len(device) == 56  # 32 hex
    assert attach(host, IscsiExport("127.0.0.1", 3260, IQN, 2)) != device  # one per LUN
    change = rdm_disk_change(Factory(), device, "[ds] vm/vm-rdm.vmdk", controller_key=1000)
    host.map_rdm("vmt-a", change)

    restarted = RecordedHost(path)  # what a restarted node (or a test) reads
    assert restarted.send_targets() == [("127.0.0.1", 3260)]
    assert restarted.rdms() == {
        "vmt-a": {"iqn": IQN, "lun": 1, "device": device, "mode": "physicalMode",
                  "mapping_file": "[ds] vm/vm-rdm.vmdk", "controller_key": 1000, "unit": 0}
    }  # fmt: skip
    restarted.unmap_rdm("vmt-a")
    restarted.unmap_rdm("vmt-a")  # unmapped already: no error
    assert RecordedHost(path).rdms() == {}
