"""``esx_host = vsphere``: the ESXi host's iSCSI and RDM calls, made by the real
``VCenterMachines`` session code against an in-process fake of vCenter's vim calls (govmomi's
simulator has no iSCSI adapter and cannot hold an RDM disk). The fake records each method, the
managed object it was sent to and the fields of what was sent, and answers as vSphere does:
a LUN shows up in ``scsiTopology``/``scsiLun`` only once its portal is a send target of the
software adapter and that adapter was rescanned."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest
from oslo_vmware import exceptions as vexc
from oslo_vmware import vim_util

from brick.tgt import Chap
from virtman.errors import InstanceNotFound
from virtman.guest.vcenter import (
    TAG_KEY,
    VCenterMachines,
    VCenterSettings,
    VCenterTaskFailed,
    _Inventory,
)
from virtman.guest.vcenter_esx import NoSoftwareIscsi, VSphereHost
from virtman.guest.vcenter_rdm import IscsiExport, LunNotVisible, attach

IQN = "iqn.2010-10.org.openstack:vmdisk-guest-1"
OTHER_IQN = "iqn.2010-10.org.openstack:vmdisk-guest-2"
PORTAL = ("127.0.0.1", 3260)
EXPORT = IscsiExport(*PORTAL, iqn=IQN, lun=1)
STORAGE = "HostStorageSystem:storageSystem-7"
VM = "VirtualMachine:vm-1"
SOFTWARE_HBA = "key-vim.host.InternetScsiHba-vmhba65"

_TYPES: dict[str, type] = {}


def vim(kind: str, **fields: Any) -> Any:
    """A vSphere data object: its Python type is named like the vSphere type (as suds'
    objects are), which is how the code under test tells types apart."""
    cls = _TYPES.setdefault(kind, type(kind, (SimpleNamespace,), {}))
    return cls(**fields)


class Moref:
    """A ManagedObjectReference: ``_type`` and ``value``, as suds has them."""

    def __init__(self, kind: str, value: str) -> None:
        self._type, self.value = kind, value

    def __repr__(self) -> str:
        return f"{self._type}:{self.value}"

    def __eq__(self, other: object) -> bool:
        return repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


def fields(value: Any) -> Any:
    """What was sent, as plain data: a data object becomes its type and fields."""
    if isinstance(value, list):
        return [fields(v) for v in value]
    if isinstance(value, dict):
        return {k: fields(v) for k, v in value.items()}
    if isinstance(value, SimpleNamespace):
        return {"type": type(value).__name__, **{k: fields(v) for k, v in vars(value).items()}}
    return value


class Factory:
    def create(self, name: str) -> Any:
        return vim(name.removeprefix("ns0:"))


class FakeVSphere:
    """An oslo.vmware session on a vCenter with one ESXi host (``esx-7.example``), our VM
    ``vmt-g1`` on it, a foreign ``vmt-g9``, and a node exporting ``luns`` at its portals."""

    def __init__(self, luns: dict[tuple[str, int], dict[tuple[str, int], str]], *,
                 software_iscsi: bool = True) -> None:  # fmt: skip
        self.vim = SimpleNamespace(client=SimpleNamespace(factory=Factory()))
        self.luns = luns  # portal -> (iqn, lun) -> naa id, what the node exports
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.visible: dict[tuple[str, int], str] = {}  # (iqn, lun) -> naa id after a rescan
        self.hbas = [vim("HostBlockHba", key="key-vim.host.BlockHba-vmhba0", device="vmhba0")]
        if software_iscsi:
            self.hbas.append(vim("HostInternetScsiHba", key=SOFTWARE_HBA, device="vmhba65",
                                 isSoftwareBased=True, configuredSendTarget=[]))  # fmt: skip
        self.devices = [vim("ParaVirtualSCSIController", key=1000, busNumber=0)]
        self.fail_reconfigure: str | None = None  # the fault of the next ReconfigVM_Task
        self._tasks: dict[str, Exception | None] = {}
        self._keys = itertools.count(2000)
        self.host = Moref("HostSystem", "host-7")
        self.vm = Moref("VirtualMachine", "vm-1")
        self.foreign = Moref("VirtualMachine", "vm-9")

    # -- the session -----------------------------------------------------------------------
    def invoke_api(self, module: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if module is vim_util and method == "get_object_property":
            return self._property(args[1], args[2])
        if module is vim_util and method == "get_object_properties_dict":
            return {name: self._property(args[1], name) for name in args[2]}
        assert module is self.vim, (module, method)
        self.calls.append((method, repr(args[0]), fields(kwargs)))
        return getattr(self, method)(args[0], **kwargs)

    def wait_for_task(self, task: Moref) -> Any:
        error = self._tasks.pop(task.value)
        if error is not None:
            raise error
        return SimpleNamespace(result=None)

    # -- properties ------------------------------------------------------------------------
    def _property(self, moref: Moref, name: str) -> Any:
        ours = vim("ArrayOfOptionValue", OptionValue=[vim("OptionValue", key=TAG_KEY, value="g1")])
        table: dict[tuple[str, str], Any] = {
            ("Folder:group-v1", "childEntity"): vim(
                "ArrayOfManagedObjectReference", ManagedObjectReference=[self.foreign, self.vm]
            ),
            ("VirtualMachine:vm-1", "name"): "vmt-g1",
            ("VirtualMachine:vm-1", "config.extraConfig"): ours,
            ("VirtualMachine:vm-1", "config.instanceUuid"): "uuid-1",
            ("VirtualMachine:vm-1", "runtime.powerState"): "poweredOff",
            ("VirtualMachine:vm-1", "runtime.host"): self.host,
            ("VirtualMachine:vm-1", "config.hardware.device"): vim(
                "ArrayOfVirtualDevice", VirtualDevice=list(self.devices)
            ),
            ("VirtualMachine:vm-9", "name"): "vmt-g9",  # not tagged: not ours
            ("VirtualMachine:vm-9", "config.extraConfig"): None,
            ("VirtualMachine:vm-9", "config.instanceUuid"): "uuid-9",
            ("VirtualMachine:vm-9", "runtime.powerState"): "poweredOn",
            ("HostSystem:host-7", "name"): "esx-7.example",
            ("HostSystem:host-7", "configManager.storageSystem"): Moref(
                "HostStorageSystem", "storageSystem-7"
            ),
            (STORAGE, "storageDeviceInfo"): self._device_info(),
        }
        return table[(repr(moref), name)]

    def _device_info(self) -> Any:
        """A local disk on vmhba0 at LUN 1 too, and each visible LUN under its target."""
        local_lun = vim("HostScsiTopologyLun", key="l0", lun=1, scsiLun="key-local")
        local = vim("HostScsiTopologyTarget", key="t0", target=0,
                    transport=vim("HostBlockAdapterTargetTransport"), lun=[local_lun])  # fmt: skip
        targets = [
            vim("HostScsiTopologyTarget", key=f"t-{iqn}", target=n,
                transport=vim("HostInternetScsiTargetTransport", iScsiName=iqn),
                lun=[vim("HostScsiTopologyLun", key=f"l-{naa}", lun=lun, scsiLun=f"key-{naa}")])
            for n, ((iqn, lun), naa) in enumerate(sorted(self.visible.items()))
        ]  # fmt: skip
        disks = [vim("HostScsiDisk", key="key-local", canonicalName="mpx.vmhba0:C0:T0:L1",
                     deviceName="/vmfs/devices/disks/mpx.vmhba0:C0:T0:L1")]  # fmt: skip
        disks += [
            vim("HostScsiDisk", key=f"key-{naa}", canonicalName=naa,
                deviceName=f"/vmfs/devices/disks/{naa}")
            for naa in sorted(self.visible.values())
        ]  # fmt: skip
        interfaces = [vim("HostScsiTopologyInterface", key="i0", adapter=self.hbas[0].key,
                          target=[local])]  # fmt: skip
        if len(self.hbas) > 1:
            interfaces.append(vim("HostScsiTopologyInterface", key="i1", adapter=SOFTWARE_HBA,
                                  target=targets))  # fmt: skip
        return vim("HostStorageDeviceInfo", hostBusAdapter=list(self.hbas), scsiLun=disks,
                   scsiTopology=vim("HostScsiTopology", adapter=interfaces),
                   softwareInternetScsiEnabled=len(self.hbas) > 1)  # fmt: skip

    # -- methods ---------------------------------------------------------------------------
    def _hba(self, device: str) -> Any:
        for hba in self.hbas:
            if hba.device == device:
                return hba
        raise vexc.VimFaultException(["NotFound"], f"no host bus adapter {device}")

    def AddInternetScsiSendTargets(self, moref: Moref, *, iScsiHbaDevice: str,
                                   targets: list[Any]) -> None:  # fmt: skip
        hba = self._hba(iScsiHbaDevice)
        if type(hba).__name__ != "HostInternetScsiHba":
            raise vexc.VimFaultException(["HostConfigFault"], f"{iScsiHbaDevice} is not iSCSI")
        hba.configuredSendTarget += targets

    def RescanHba(self, moref: Moref, *, hbaDevice: str) -> None:
        for target in getattr(self._hba(hbaDevice), "configuredSendTarget", []):
            self.visible.update(self.luns.get((target.address, target.port), {}))

    def ReconfigVM_Task(self, moref: Moref, *, spec: Any) -> Moref:
        task = f"task-{next(self._keys)}"
        for change in spec.deviceChange:
            if change.operation == "add":
                change.device.key = next(self._keys)
                self.devices.append(change.device)
            elif change.operation == "remove":
                self.devices = [d for d in self.devices if d.key != change.device.key]
        fault, self.fail_reconfigure = self.fail_reconfigure, None
        # Like govmomi's simulator: a failed task that still keeps the device.
        self._tasks[task] = vexc.VimFaultException([fault], f"{fault}: no") if fault else None
        return Moref("Task", task)

    def rdms(self) -> list[str]:
        return [d.backing.deviceName for d in self.devices if type(d).__name__ == "VirtualDisk"]


def machines(fake: FakeVSphere) -> VCenterMachines:
    """The real ``VCenterMachines`` on the fake session (its login is not under test)."""
    vc = object.__new__(VCenterMachines)
    vc.settings = VCenterSettings(host="127.0.0.1", username="u", password="p")
    vc.prefix = "vmt-"
    vc._session = fake
    folder = Moref("Folder", "group-v1")
    vc._inventory = _Inventory(datacenter=None, vm_folder=folder, compute=None, pool=None,
                               datastore="ds1")  # fmt: skip
    return vc


def rig(**kwargs: Any) -> tuple[FakeVSphere, VCenterMachines, VSphereHost]:
    luns = {PORTAL: {(IQN, 1): "naa.600c", (OTHER_IQN, 1): "naa.600a", (IQN, 2): "naa.600b"}}
    fake = FakeVSphere(luns, **kwargs)
    vc = machines(fake)
    return fake, vc, VSphereHost(vc)


def test_the_lun_is_found_on_the_vms_host_and_mapped_as_its_rdm() -> None:
    fake, vc, host = rig()
    device = attach(host.storage_for("vmt-g1"), EXPORT)
    assert device == "/vmfs/devices/disks/naa.600c"  # not the other IQN's LUN 1, nor vmhba0's
    host.map_rdm("vmt-g1", vc.rdm_change("g1", device))
    assert fake.calls[:2] == [
        ("AddInternetScsiSendTargets", STORAGE, {"iScsiHbaDevice": "vmhba65", "targets": [
            {"type": "HostInternetScsiHbaSendTarget", "address": "127.0.0.1", "port": 3260}]}),
        ("RescanHba", STORAGE, {"hbaDevice": "vmhba65"}),
    ]  # fmt: skip
    method, moref, sent = fake.calls[2]
    assert (method, moref, len(fake.calls)) == ("ReconfigVM_Task", VM, 3)
    (change,) = sent["spec"]["deviceChange"]
    assert (sent["spec"]["type"], change["operation"], change["fileOperation"]) == (
        "VirtualMachineConfigSpec", "add", "create",
    )  # fmt: skip
    disk = change["device"]
    assert (disk["type"], disk["controllerKey"], disk["unitNumber"]) == ("VirtualDisk", 1000, 0)
    assert disk["backing"] == {
        "type": "VirtualDiskRawDiskMappingVer1BackingInfo", "deviceName": device,
        "compatibilityMode": "physicalMode", "diskMode": "independent_persistent",
        "fileName": "[ds1] vmt-g1/vmt-g1-rdm.vmdk",
    }  # fmt: skip
    assert fake.rdms() == [device]


def test_a_node_with_chap_gives_the_send_target_its_account() -> None:
    luns = {PORTAL: {(IQN, 1): "naa.600c"}}
    fake = FakeVSphere(luns)
    host = VSphereHost(machines(fake), Chap("vmt-node", "secret-of-12+"))
    attach(host.storage_for("vmt-g1"), EXPORT)
    (target,) = fake.calls[0][2]["targets"]
    assert target["authenticationProperties"] == {
        "type": "HostInternetScsiHbaAuthenticationProperties", "chapAuthEnabled": True,
        "chapInherited": False, "chapAuthenticationType": "chapRequired",
        "chapName": "vmt-node", "chapSecret": "secret-of-12+",
    }  # fmt: skip


def test_a_configured_portal_is_not_added_again_and_a_seen_lun_needs_no_call() -> None:
    fake, _, host = rig()
    storage = host.storage_for("vmt-g1")
    attach(storage, EXPORT)
    fake.calls.clear()
    assert attach(storage, EXPORT) == "/vmfs/devices/disks/naa.600c"
    assert fake.calls == []
    fake.visible.clear()  # the node exports a new LUN: only a rescan is needed
    assert attach(storage, IscsiExport(*PORTAL, iqn=IQN, lun=2)).endswith("/naa.600b")
    assert fake.calls == [("RescanHba", STORAGE, {"hbaDevice": "vmhba65"})]


def test_a_host_without_a_software_iscsi_adapter_is_named_and_nothing_is_sent() -> None:
    fake, _, host = rig(software_iscsi=False)
    with pytest.raises(NoSoftwareIscsi, match=r"ESXi host esx-7\.example has no software iSCSI"):
        attach(host.storage_for("vmt-g1"), EXPORT)
    assert fake.calls == []


def test_a_lun_the_host_does_not_see_after_the_rescan_is_lun_not_visible() -> None:
    fake, _, host = rig()
    missing = IscsiExport(*PORTAL, iqn="iqn.2010-10.org.openstack:vmdisk-gone", lun=1)
    with pytest.raises(LunNotVisible, match=r"vmdisk-gone lun 1 after adding 127\.0\.0\.1:3260"):
        attach(host.storage_for("vmt-g1"), missing)
    assert [c[0] for c in fake.calls] == ["AddInternetScsiSendTargets", "RescanHba"]


def test_a_failed_reconfigure_is_undone_and_nothing_stays_mapped() -> None:
    fake, vc, host = rig()
    device = attach(host.storage_for("vmt-g1"), EXPORT)
    fake.calls.clear()
    fake.fail_reconfigure = "InvalidDeviceSpec"
    with pytest.raises(VCenterTaskFailed, match=r"ReconfigVM_Task for vmt-g1 failed.*InvalidDev"):
        host.map_rdm("vmt-g1", vc.rdm_change("g1", device))
    assert [(c[0], c[1]) for c in fake.calls] == [("ReconfigVM_Task", VM)] * 2
    (undo,) = fake.calls[1][2]["spec"]["deviceChange"]
    assert (undo["operation"], undo["fileOperation"]) == ("remove", "destroy")
    assert undo["device"]["backing"]["deviceName"] == device
    assert fake.rdms() == []
    assert [type(d).__name__ for d in fake.devices] == ["ParaVirtualSCSIController"]


def test_unmap_removes_the_rdm_only_and_is_idempotent() -> None:
    fake, vc, host = rig()
    host.map_rdm("vmt-g1", vc.rdm_change("g1", attach(host.storage_for("vmt-g1"), EXPORT)))
    fake.calls.clear()
    host.unmap_rdm("vmt-g1")
    assert [(c[0], c[1]) for c in fake.calls] == [("ReconfigVM_Task", VM)]
    assert [type(d).__name__ for d in fake.devices] == ["ParaVirtualSCSIController"]
    host.unmap_rdm("vmt-g1")  # no RDM left
    host.unmap_rdm("vmt-g9")  # not ours
    host.unmap_rdm("vmt-none")  # no VM
    assert len(fake.calls) == 1


def test_a_vm_that_is_not_ours_gets_no_host_calls() -> None:
    fake, _, host = rig()
    with pytest.raises(InstanceNotFound):
        host.storage_for("vmt-g9")
    with pytest.raises(InstanceNotFound):
        host.map_rdm("vmt-g9", SimpleNamespace())
    assert fake.calls == []
