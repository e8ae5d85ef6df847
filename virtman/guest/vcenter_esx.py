"""The ESXi host's side of a VMThunder disk made on vSphere (``[vcenter] esx_host = vsphere``).

Over the oslo.vmware session of ``VCenterMachines``, on the host the VM runs on
(``vm.runtime.host``), its ``HostStorageSystem`` (``configManager.storageSystem``):

- the software iSCSI adapter: the ``HostInternetScsiHba`` with ``isSoftwareBased`` in
  ``storageDeviceInfo.hostBusAdapter`` (none: ``NoSoftwareIscsi`` naming the host);
- ``AddInternetScsiSendTargets`` with the node's portal (only if not configured yet; with the
  node's CHAP account, ``chapRequired``, when its targets ask for one), then ``RescanHba`` of
  that adapter;
- the LUN: in ``storageDeviceInfo.scsiTopology`` the adapter's target whose
  ``HostInternetScsiTargetTransport.iScsiName`` is the export's IQN, its ``lun`` of that
  number, whose ``scsiLun`` key names the ``ScsiLun`` whose ``deviceName``
  (``/vmfs/devices/disks/naa.…``) the RDM backs on;
- the RDM: ``ReconfigVM_Task`` with the ``deviceChange`` of ``rdm_disk_change``; unmapped by a
  ``ReconfigVM_Task`` removing every RDM disk of the VM (``operation = remove``,
  ``fileOperation = destroy``: the mapping file goes too). A failed map is unmapped before
  its error is raised: a task can fail yet leave the device (govmomi's simulator does).

govmomi's simulator has no iSCSI adapter and cannot hold an RDM disk, so this is tested
against an in-process fake of those calls (tests/unit/virtman/test_vcenter_esx.py), never
against a real vCenter yet.
"""

from __future__ import annotations

import logging
from typing import Any

from brick.tgt import Chap
from virtman.errors import HypervisorError, InstanceNotFound
from virtman.guest.vcenter import VCenterError, VCenterMachines

LOG = logging.getLogger(__name__)

DEFAULT_ISCSI_PORT = 3260  # a send target without a port is on it
RDM_BACKING = "VirtualDiskRawDiskMappingVer1BackingInfo"


class NoSoftwareIscsi(HypervisorError):
    """The VM's host has no software iSCSI adapter (it is enabled per host)."""

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(
            f"ESXi host {host} has no software iSCSI adapter "
            "(enable it: storageDeviceInfo.softwareInternetScsiEnabled)"
        )


def _items(value: Any, array_field: str = "") -> list[Any]:
    """A vSphere array as a list: a plain list (a data object's field), an ``ArrayOf…``
    wrapper (a property read on its own), or nothing."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return list(getattr(value, array_field, None) or [])


def _kind(value: Any) -> str:
    return type(value).__name__


class EsxStorage:
    """``HostStorage`` of one ESXi host: its ``HostStorageSystem``, read live at each call;
    ``chap``: the account the node's targets ask for (None: none)."""

    def __init__(
        self, vc: VCenterMachines, host_ref: Any, host_name: str, chap: Chap | None = None
    ) -> None:
        self.vc, self.host_name, self.chap = vc, host_name, chap
        self.system = vc.prop(host_ref, "configManager.storageSystem")

    def _device_info(self) -> Any:
        return self.vc.prop(self.system, "storageDeviceInfo")

    def _hba(self, info: Any) -> Any:
        for hba in _items(info.hostBusAdapter, "HostHostBusAdapter"):
            if _kind(hba) == "HostInternetScsiHba" and getattr(hba, "isSoftwareBased", False):
                return hba
        raise NoSoftwareIscsi(self.host_name)

    def add_send_target(self, host: str, port: int) -> None:
        hba = self._hba(self._device_info())
        for target in _items(getattr(hba, "configuredSendTarget", None)):
            if (target.address, target.port or DEFAULT_ISCSI_PORT) == (host, port):
                return
        target = self.vc.factory.create("ns0:HostInternetScsiHbaSendTarget")
        target.address, target.port = host, port
        if self.chap is not None:
            auth = self.vc.factory.create("ns0:HostInternetScsiHbaAuthenticationProperties")
            auth.chapAuthEnabled, auth.chapInherited = True, False
            auth.chapAuthenticationType = "chapRequired"
            auth.chapName, auth.chapSecret = self.chap.user, self.chap.password
            target.authenticationProperties = auth
        self.vc.call("AddInternetScsiSendTargets", self.system,
                     iScsiHbaDevice=hba.device, targets=[target])  # fmt: skip
        LOG.info("ESXi host %s: send target %s:%d on %s", self.host_name, host, port, hba.device)

    def rescan(self) -> None:
        hba = self._hba(self._device_info())
        self.vc.call("RescanHba", self.system, hbaDevice=hba.device)

    def device_of(self, iqn: str, lun: int) -> str | None:
        info = self._device_info()
        hba = self._hba(info)
        topology = getattr(info, "scsiTopology", None)
        keys = [
            found.scsiLun
            for interface in _items(getattr(topology, "adapter", None))
            if interface.adapter == hba.key
            for target in _items(getattr(interface, "target", None))
            if _kind(target.transport) == "HostInternetScsiTargetTransport"
            and target.transport.iScsiName == iqn
            for found in _items(getattr(target, "lun", None))
            if found.lun == lun
        ]
        for scsi_lun in _items(info.scsiLun, "ScsiLun"):
            if scsi_lun.key in keys:
                return str(scsi_lun.deviceName)
        return None


class VSphereHost:
    """``EsxHost`` made on vSphere through ``vc``'s session; ``chap`` as for ``EsxStorage``.
    Its callers hold the vCenter lock (``VCenterGuests._vc``): one call at a time on the
    session."""

    def __init__(self, vc: VCenterMachines, chap: Chap | None = None) -> None:
        self.vc, self.chap = vc, chap

    def _vm(self, vm_name: str) -> Any:
        vm = self.vc.vm_named(vm_name)
        if vm is None:
            raise InstanceNotFound(vm_name)
        return vm

    def storage_for(self, vm_name: str) -> EsxStorage:
        host = self.vc.prop(self._vm(vm_name), "runtime.host")
        return EsxStorage(self.vc, host, str(self.vc.prop(host, "name")), self.chap)

    def _reconfigure(self, vm_name: str, vm: Any, changes: list[Any]) -> None:
        spec = self.vc.factory.create("ns0:VirtualMachineConfigSpec")
        spec.deviceChange = changes
        self.vc.task("ReconfigVM_Task", vm_name, vm, spec=spec)

    def map_rdm(self, vm_name: str, change: Any) -> None:
        vm = self._vm(vm_name)
        try:
            self._reconfigure(vm_name, vm, [change])
        except VCenterError:
            try:
                self._unmap(vm_name, vm)
            except VCenterError as err:  # the caller destroys the VM next
                LOG.error("%s: its RDM is not undone: %s", vm_name, err)
            raise
        LOG.info("%s: RDM disk on %s", vm_name, change.device.backing.deviceName)

    def unmap_rdm(self, vm_name: str) -> None:
        vm = self.vc.vm_named(vm_name)
        if vm is not None:
            self._unmap(vm_name, vm)

    def _unmap(self, vm_name: str, vm: Any) -> None:
        devices = _items(self.vc.prop(vm, "config.hardware.device"), "VirtualDevice")
        changes = []
        for disk in devices:
            if _kind(disk) == "VirtualDisk" and _kind(disk.backing) == RDM_BACKING:
                change = self.vc.factory.create("ns0:VirtualDeviceConfigSpec")
                change.operation, change.fileOperation, change.device = "remove", "destroy", disk
                changes.append(change)
        if changes:
            self._reconfigure(vm_name, vm, changes)
            LOG.info("%s: %d RDM disk(s) removed", vm_name, len(changes))
