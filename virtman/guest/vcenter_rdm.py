"""The VMThunder disk of a vCenter VM: the node's iSCSI export as a raw device mapping.

An ESXi host reaches the node's export (portal, IQN, LUN) through its software iSCSI adapter:
``HostStorageSystem.AddInternetScsiSendTargets`` (the portal), ``RescanHba`` (the LUN shows
up as a ScsiLun with a device name), then the VM's disk is a
``VirtualDiskRawDiskMappingVer1BackingInfo`` on that device. govmomi's simulator has no iSCSI
adapter to rescan, so those host calls sit behind ``HostStorage`` and ``EsxHost``: recorded
(``RecordedHost``) or made on vSphere (``virtman.guest.vcenter_esx``, tested against an
in-process fake of the vim calls); ``rdm_disk_change`` builds the device spec the VM keeps.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from brick.values import IQN
from virtman.errors import HypervisorError
from virtman.guest.domains import InvalidVMInput

MAX_LUN = 16383  # SAM-2 flat addressing


@dataclass(frozen=True)
class IscsiExport:
    """What a node exports for one snapshot: the portal and the target's LUN."""

    host: str
    port: int
    iqn: str
    lun: int

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise InvalidVMInput("portal host", self.host, "must be an IP address") from None
        _integer("portal port", self.port, 1, 65535)
        if not IQN.is_valid(self.iqn, ("iqn",)):
            raise InvalidVMInput("iqn", self.iqn, "must be an iSCSI qualified name (iqn.YYYY-MM.…)")
        _integer("lun", self.lun, 0, MAX_LUN)


def _integer(field: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidVMInput(field, value, f"must be an integer in {low}..{high}")


class HostStorage(Protocol):
    """The ESXi host's storage calls the simulator cannot do for real."""

    def add_send_target(self, host: str, port: int) -> None: ...

    def rescan(self) -> None: ...

    def device_of(self, iqn: str, lun: int) -> str | None:
        """The ScsiLun's device name (``/vmfs/devices/disks/…``) once the host sees it."""
        ...


class LunNotVisible(HypervisorError):
    """The host rescanned and still does not see the export's LUN."""

    def __init__(self, export: IscsiExport) -> None:
        self.export = export
        super().__init__(
            f"ESXi host does not see {export.iqn} lun {export.lun} after adding "
            f"{export.host}:{export.port} and a rescan"
        )


def attach(storage: HostStorage, export: IscsiExport) -> str:
    """Make the host see ``export``; its device name. Rescans only when it is not seen yet."""
    device = storage.device_of(export.iqn, export.lun)
    if device is None:
        storage.add_send_target(export.host, export.port)
        storage.rescan()
        device = storage.device_of(export.iqn, export.lun)
    if device is None:
        raise LunNotVisible(export)
    return device


def rdm_disk_change(
    factory: Any, device: str, mapping_file: str, *, controller_key: int, unit: int = 0
) -> Any:
    """The ``deviceChange`` entry adding a physical-mode RDM disk on ``device``; its mapping
    file (``[datastore] dir/name.vmdk``) is created beside the VM's files."""
    backing = factory.create("ns0:VirtualDiskRawDiskMappingVer1BackingInfo")
    backing.deviceName = device
    backing.compatibilityMode = "physicalMode"
    backing.diskMode = "independent_persistent"
    backing.fileName = mapping_file
    disk = factory.create("ns0:VirtualDisk")
    disk.key = -100 - unit
    disk.controllerKey = controller_key
    disk.unitNumber = unit
    disk.backing = backing
    change = factory.create("ns0:VirtualDeviceConfigSpec")
    change.operation = "add"
    change.fileOperation = "create"
    change.device = disk
    return change


class EsxHost(Protocol):
    """The ESXi host's side of a VMThunder disk: the iSCSI adapter (``HostStorage``) of the
    host a VM runs on, and the ``ReconfigVM_Task`` that maps the LUN into that VM (a
    ``deviceChange`` from ``VCenterMachines.rdm_change``), undone by ``unmap_rdm``."""

    def storage_for(self, vm_name: str) -> HostStorage:
        """The storage of the host ``vm_name`` runs on (``vm.runtime.host``)."""
        ...

    def map_rdm(self, vm_name: str, change: Any) -> None: ...

    def unmap_rdm(self, vm_name: str) -> None:
        """No RDM disk left in ``vm_name``; a VM without one, or no VM, is success."""
        ...


class RecordedHost:
    """An ``EsxHost`` that records its calls in a JSON file instead of making them: the
    seam for govmomi's simulator, which has no iSCSI adapter to rescan and cannot hold an RDM
    disk (``ReconfigVM_Task`` answers ``InvalidDeviceSpec``; ``Destroy_Task`` of a VM with one
    panics). The file is what a test reads to check that each VM's disk points at the right
    portal, IQN and LUN."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            state = {}
        self._state: dict[str, Any] = {
            "send_targets": state.get("send_targets", []),
            "seen": state.get("seen", []),  # portals a rescan found
            "luns": state.get("luns", {}),  # device -> the iqn and lun it was seen as
            "rdms": state.get("rdms", {}),
        }

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def storage_for(self, vm_name: str) -> RecordedHost:
        """One recorded host holds every VM."""
        return self

    def add_send_target(self, host: str, port: int) -> None:
        with self._lock:
            if [host, port] not in self._state["send_targets"]:
                self._state["send_targets"].append([host, port])
                self._save()

    def rescan(self) -> None:
        with self._lock:
            self._state["seen"] = list(self._state["send_targets"])
            self._save()

    def device_of(self, iqn: str, lun: int) -> str | None:
        """Seen once a rescan found a portal: the recording cannot ask a portal which
        targets it has."""
        digest = hashlib.sha256(f"{iqn}:{lun}".encode()).hexdigest()[:31]
        device = f"/vmfs/devices/disks/naa.6{digest}"
        with self._lock:
            if not self._state["seen"]:
                return None
            if device not in self._state["luns"]:
                self._state["luns"][device] = {"iqn": iqn, "lun": lun}
                self._save()
        return device

    def map_rdm(self, vm_name: str, change: Any) -> None:
        disk = change.device
        with self._lock:
            self._state["rdms"][vm_name] = {
                **self._state["luns"].get(disk.backing.deviceName, {}),
                "device": disk.backing.deviceName,
                "mapping_file": disk.backing.fileName,
                "mode": disk.backing.compatibilityMode,
                "controller_key": disk.controllerKey,
                "unit": disk.unitNumber,
            }
            self._save()

    def unmap_rdm(self, vm_name: str) -> None:
        with self._lock:
            if self._state["rdms"].pop(vm_name, None) is not None:
                self._save()

    def rdms(self) -> dict[str, dict[str, Any]]:
        """VM name -> its RDM disk: device, iqn, lun, mapping file, mode, controller."""
        with self._lock:
            return dict(self._state["rdms"])

    def send_targets(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(h, p) for h, p in self._state["send_targets"]]
