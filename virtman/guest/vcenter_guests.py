"""``VCenterGuests``: a node's guests as VMs of a vCenter, behind the same guest verbs as the
libvirt backend (``virtman.guest.manager.Guests``), for ``[DEFAULT] guest_backend = vcenter``.

A guest's disk is its VMThunder snapshot on this node (``Virtman.create``), exported by this
node's tgtd (``DiskExports``) and mapped into the VM as a raw device mapping by the ESXi host
(``EsxHost``: add the node's portal to the software iSCSI adapter, rescan, the LUN's device,
``ReconfigVM_Task`` with ``VCenterMachines.rdm_change``). ``deploy``:

1. the snapshot (``Virtman.create``), 2. its export, 3. ``CreateVM_Task`` (off, with a
paravirtual SCSI controller), 4. ``attach`` on the host and the RDM's ``deviceChange``
mapped into the VM. Any failure undoes what came before, in reverse, and the record says
nothing was deployed.

``delete`` powers off and destroys the VM, unmaps the RDM, removes the export, releases the
snapshot and forgets the guest; a vCenter that does not answer fails it, record kept, so a
later delete finishes it. ``adopt`` (at start) undoes an interrupted deploy, exports again
what tgtd lost (``restore_exports``, also after the supervisor restarted tgtd), and lists our
VMs without a record as orphans (never destroyed).

Calls to vCenter go one at a time (one oslo.vmware session; suds is not thread-safe).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from brick.exception import BrickError
from virtman import validation
from virtman.errors import GuestStateError, InstanceNotFound, VirtmanError
from virtman.guest import records
from virtman.guest.disk_export import DiskExports
from virtman.guest.records import Connections, GuestRecords
from virtman.guest.vcenter import VCenterError, VCenterMachines
from virtman.guest.vcenter_rdm import EsxHost, IscsiExport, attach
from virtman.layers.base import Revived

LOG = logging.getLogger(__name__)

POWER = {"running": "on", "paused": "paused"}  # VCenterVMInfo.state -> the API's power


class VCenterGuests(GuestRecords):
    """The guests of one node on ``machines``; ``virtman`` is its ``Virtman`` (snapshots,
    journal, state_dir); ``connections(image)`` as for ``Guests``; ``cpu_allocation_ratio``
    scales the hosts' CPU threads into the vCPUs reported as capacity."""

    def __init__(
        self,
        virtman: Any,
        machines: VCenterMachines,
        host: EsxHost,
        exports: DiskExports,
        *,
        connections: Connections,
        name_prefix: str = "guest-",
        cpu_allocation_ratio: float = 4.0,
    ) -> None:
        super().__init__(virtman.journal, name_prefix)
        self.virtman = virtman
        self.machines = machines
        self.host = host
        self.exports = exports
        self.connections = connections
        self.cpu_allocation_ratio = cpu_allocation_ratio
        self.state_dir = virtman.settings.state_dir
        self._vc_lock = threading.Lock()
        self._orphans: builtins.list[str] = []

    def close(self) -> None:
        """Log out of vCenter (the daemon's exit)."""
        with self._vc() as vms:
            vms.close()

    @contextlib.contextmanager
    def _vc(self) -> Iterator[VCenterMachines]:
        with self._vc_lock:
            yield self.machines

    def _deployed(self, uid: str) -> dict[str, Any]:
        record = self._record(uid)
        if not record.get("disk"):
            raise GuestStateError(uid, "no disk deployed yet (deploy an image first)")
        return record

    # -- deploy and delete -------------------------------------------------------------------
    def deploy(self, userid: str, image: str) -> None:
        """The guest's disk becomes a VMThunder snapshot of ``image``, exported to the ESXi
        host and mapped into a new VM (off). ``GuestStateError`` if deployed already."""
        with self._locked(userid) as uid:
            record = self._record(uid)
            if record.get("disk") or record.get("deploying"):
                raise GuestStateError(uid, f"deployed already (image {record.get('image')})")
            name = validation.image_name(image)
            connections = self.connections(name)
            instance = self.instance_name(uid)
            record = self._save(uid, record, deploying=name)  # first: adopt() can undo
            code, disk = records.result_of(self.virtman.create(instance, name, connections, None))
            if code != 0:
                self._save(uid, record, deploying=None)
                raise VirtmanError(f"deploy of {uid}: the snapshot of {name} failed: {disk}")
            try:
                export = self.exports.export(instance, disk)
                vm = self._make_vm(instance, record, export)
            except BaseException:
                self._undo(uid, instance)
                self._save(uid, record, deploying=None)
                raise
            self._save(
                uid, record, deploying=None, image=name, disk=disk, export=asdict(export),
                vm=vm, state="off",
            )  # fmt: skip
        LOG.info("guest %s deployed from %s: %s, %s lun %d", uid, name, vm, export.iqn, export.lun)

    def _make_vm(self, instance: str, record: dict[str, Any], export: IscsiExport) -> str:
        """Steps 3-4 of ``deploy``; the VM's name. The VM is destroyed if step 4 fails."""
        with self._vc() as vms:
            info = vms.boot(
                instance, vcpus=record["vcpus"], memory_mb=record["memory_mb"], power_on=False
            )
            try:
                device = attach(self.host.storage_for(info.domain), export)
                self.host.map_rdm(info.domain, vms.rdm_change(instance, device))
            except BaseException:
                with contextlib.suppress(VCenterError):
                    vms.destroy(instance)
                raise
        return info.domain

    def _undo(self, uid: str, instance: str) -> None:
        """Best effort, in reverse: the VM, its RDM, the export, the snapshot."""
        try:
            with self._vc() as vms:
                vms.destroy(instance)
                self.host.unmap_rdm(vms.domain_name(instance))
        except VirtmanError as err:
            LOG.error("guest %s: its VM is not undone (listed in orphans): %s", uid, err)
        try:
            self.exports.remove(instance)
        except Exception as err:  # tgtd's error: logged, the target is found again by adopt
            LOG.error("guest %s: its export is not removed: %s", uid, err)
        code, info = records.result_of(self.virtman.destroy(instance))
        if code == 2:
            LOG.error("guest %s: its snapshot is not released: %s", uid, info)

    def delete(self, userid: str) -> None:
        """Power off, destroy the VM, unmap, unexport, release the snapshot, forget.
        ``GuestNotFound`` if unknown; a vCenter error keeps the record (delete again)."""
        with self._locked(userid) as uid:
            record = self._record(uid)
            instance = self.instance_name(uid)
            with self._vc() as vms:
                vms.destroy(instance)  # no VM: nothing to do
                self.host.unmap_rdm(vms.domain_name(instance))
            self.exports.remove(instance)
            if record.get("disk") or record.get("deploying"):
                code, info = records.result_of(self.virtman.destroy(instance))
                if code == 2:
                    raise VirtmanError(f"delete of {uid}: releasing its snapshot failed: {info}")
            self.journal.drop(records.KIND, uid)
        LOG.info("guest %s deleted", uid)

    # -- power -------------------------------------------------------------------------------
    def _power(self, userid: str, state: str, verb: str) -> None:
        """``VCenterMachines.<verb>`` on the guest's VM; the record says ``state`` after."""
        with self._locked(userid) as uid:
            record = self._deployed(uid)
            with self._vc() as vms:
                try:
                    getattr(vms, verb)(self.instance_name(uid))
                except InstanceNotFound as err:
                    raise GuestStateError(uid, "its VM is gone from vCenter") from err
            self._save(uid, record, state=state)
        LOG.info("guest %s: %s", uid, state)

    def start(self, userid: str) -> None:
        self._power(userid, "on", "start")

    def stop(self, userid: str) -> None:
        self._power(userid, "off", "stop")

    def softstop(
        self, userid: str, *, timeout_s: float = 300.0, poll_interval_s: float = 10.0
    ) -> None:
        """A power off: the VMs have no VMware Tools to take a guest shutdown."""
        records.check_softstop(timeout_s, poll_interval_s)
        self.stop(userid)

    def pause(self, userid: str) -> None:
        self._running(userid, "pause")
        self._power(userid, "paused", "suspend")

    def unpause(self, userid: str) -> None:
        self._power(userid, "on", "start")

    def reboot(self, userid: str) -> None:
        """A reset: without VMware Tools there is no guest reboot."""
        self.reset(userid)

    def reset(self, userid: str) -> None:
        self._running(userid, "reset")
        self._power(userid, "on", "reset")

    def _running(self, userid: str, what: str) -> None:
        if self.power_state(userid) != "on":
            raise GuestStateError(records.validate_userid(userid), f"cannot {what}: it is not on")

    def capture(self, userid: str, image: str) -> dict[str, Any]:
        raise GuestStateError(
            records.validate_userid(userid), "capture is not on the vcenter backend"
        )

    def set_nics(
        self, userid: str, nics: builtins.list[dict[str, Any]], *, live: bool = False
    ) -> None:
        raise GuestStateError(
            records.validate_userid(userid), "NICs on Linux bridges are not on the vcenter backend"
        )

    # -- reading -----------------------------------------------------------------------------
    def _vm_state(self, uid: str) -> str | None:
        """The VM's state in vCenter (``VCenterVMInfo.state``); None without one."""
        if not self._record(uid).get("disk"):
            return None
        with self._vc() as vms:
            try:
                return vms.info(self.instance_name(uid)).state
            except InstanceNotFound:
                return None

    def power_state(self, userid: str) -> str:
        state = self._vm_state(records.validate_userid(userid))
        return POWER.get(state or "", "off")

    def info(self, userid: str) -> dict[str, Any]:
        uid = records.validate_userid(userid)
        record = self._record(uid)
        power = POWER.get(self._vm_state(uid) or "", "off")
        return {
            "power_state": power,
            "max_mem_kb": record["memory_mb"] * 1024,
            "mem_kb": record["memory_mb"] * 1024 if power != "off" else 0,
            "num_cpu": record["vcpus"],
            "cpu_time_us": 0,  # vCenter's quickStats have no CPU time
        }

    def definition(self, userid: str) -> str:
        """The VM as vCenter has it, its host and its disk's export, as JSON."""
        uid = records.validate_userid(userid)
        record = self._deployed(uid)
        instance = self.instance_name(uid)
        with self._vc() as vms:
            try:
                info, host = vms.info(instance), vms.host_of(instance)
            except InstanceNotFound as err:
                raise GuestStateError(uid, "its VM is gone from vCenter") from err
        return json.dumps({**asdict(info), "host": host, "export": record.get("export")})

    def stats(self, userid: str) -> dict[str, Any]:
        self._deployed(records.validate_userid(userid))
        return {"cpu": {}, "mem": {}, "nics": []}

    def console_output(self, userid: str) -> str:
        """Empty: a vCenter VM's console is not a file on this node."""
        self._record(records.validate_userid(userid))
        return ""

    def host_info(self) -> dict[str, Any]:
        """The vCenter hosts' capacity (the connected hosts VMs are placed on), this node's
        state_dir as the disk pool (the snapshots live there)."""
        with self._vc() as vms:
            hosts = [h for h in vms.hosts() if h.connected]
            endpoint = vms.settings.endpoint
        threads = sum(h.cpu_threads for h in hosts)
        memory_mb = sum(h.memory_mb for h in hosts)
        guests = self.journal.records(records.KIND).values()
        disk = shutil.disk_usage(self.state_dir)
        return {
            "backend": "vcenter",
            "hypervisor_hostname": endpoint,
            "hypervisor_type": "vcenter",
            "hypervisor_version": 0,
            "vcpus": int(threads * self.cpu_allocation_ratio),
            "vcpus_used": sum(r["vcpus"] for r in guests if r.get("state") != "off"),
            "memory_mb": memory_mb,
            "memory_mb_used": min(memory_mb, sum(h.memory_mb_used for h in hosts)),
            "disk_total": disk.total >> 30,
            "disk_used": disk.used >> 30,
            "disk_available": disk.free >> 30,
            "cpu_info": {"hosts": [h.name for h in hosts], "threads": threads},
            "ipl_time": time.strftime(
                "IPL at %m/%d/%y %H:%M:%S UTC", time.gmtime(records.boot_time())
            ),
        }

    # -- restart -------------------------------------------------------------------------------
    def adopt(self) -> None:
        """At start: a deploy a crash interrupted is undone; a deployed guest's export is
        made again if tgtd lost it; our VMs with no record are orphans (left alone)."""
        for uid, record in sorted(self.journal.records(records.KIND).items()):
            if record.get("deploying") and not record.get("disk"):
                LOG.warning("guest %s: its deploy was interrupted: undone", uid)
                self._undo(uid, self.instance_name(uid))
                self._save(uid, record, deploying=None)
        self.restore_exports()
        self.orphans()
        for instance in self._orphans:
            LOG.warning("orphan: a VM of ours in vCenter for %s, no guest recorded", instance)

    def restore_exports(self, revived: Revived | None = None) -> int:
        """Export again every deployed guest's disk tgtd does not have (at start, or after
        tgtd died: a supervisor listener); how many. A failure is logged per guest."""
        if revived is not None and not revived.targets:
            return 0
        restored = 0
        for uid, record in sorted(self.journal.records(records.KIND).items()):
            instance = self.instance_name(uid)
            try:
                if record.get("disk") and not self.exports.exported(instance):
                    self.exports.export(instance, record["disk"])
                    LOG.warning("guest %s: its disk's export was lost: exported again", uid)
                    restored += 1
            except (BrickError, VirtmanError) as err:
                LOG.error("guest %s: its disk is not exported again: %s", uid, err)
        return restored

    def orphans(self) -> builtins.list[str]:
        """Instances of our VMs in vCenter with no guest record (never destroyed)."""
        known = [self.instance_name(u) for u in self.journal.records(records.KIND)]
        with contextlib.suppress(VCenterError), self._vc() as vms:
            found = vms.orphans(known)
            self._orphans = sorted(
                i.instance for i in found if i.instance.startswith(self.name_prefix)
            )
        return list(self._orphans)
