"""``Guests``: the VMs a node's virtmanserver owns, for the z/VM-shaped guest API.

A guest is named by its z/VM userid (1-8 of ``[A-Za-z0-9]``, upper-cased on input). Its
instance name is ``<name_prefix><USERID>`` (the snapshot's name, ``Virtman.create``) and its
libvirt domain ``vmt-<instance>`` (``VirtualMachines``: the ``vmt:instance`` metadata marks it
as ours). Lifecycle:

- ``create`` records the guest in the node's journal (section ``guests``): no domain yet.
- ``deploy`` makes its root disk, a VMThunder snapshot of the image (``Virtman.create``),
  and defines the domain on it (direct kernel boot, serial console to a file), not started.
- the power verbs act on the domain; the journal keeps the state the guest was asked to be in.
- ``delete`` powers off, undefines, releases the snapshot (``Virtman.destroy``), forgets it.
- ``set_nics`` records the guest's NICs (virtio, each on a Linux bridge, its MAC fixed) and
  attaches them to (or detaches them from) its domain's definition, and with ``live`` from
  the running guest too; a domain defined later (deploy, adopt) has them.
- live migration (``virtman.guest.migration``): the destination's ``prepare_incoming``
  records the guest as ``incoming`` and makes its snapshot; the source's ``migrate`` moves
  it and then releases its own domain, snapshot and record; the destination's
  ``finish_incoming`` records it running, or ``abort_incoming`` removes what prepare made.

``adopt`` (at every start of the daemon) reads the journal: running domains are adopted
as they are (never restarted); a deploy a crash interrupted is undone or finished; a
recorded domain that is gone is defined again from the record; an incoming guest whose
migration never arrived is removed; a domain of ours (prefix +
metadata) with no record is an orphan: logged and listed by ``orphans()``, never touched.

Thread-safe: one lock per userid serialises the verbs of a guest; libvirt's connection is
shared (libvirt-python is thread-safe; opening it is guarded).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import os
import shutil
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from brick.exception import Timeout
from brick.wait import wait_until
from virtman import validation
from virtman.errors import (
    GuestExists,
    GuestStateError,
    VirtmanError,
)
from virtman.guest import migration
from virtman.guest.domains import VirtualMachines, VMError
from virtman.guest.records import (
    KIND,
    MAX_VCPUS,
    MEMORY_MB,
    Connections,
    GuestRecords,
    boot_time,
    check_softstop,
    integer,
    result_of,
    validate_userid,
)

LOG = logging.getLogger(__name__)

CONSOLE_MAX_BYTES = 1 << 20  # console_output returns at most the last MiB
_ON = {libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_SHUTDOWN}
_PAUSED = {libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED}
HOST_INFO_KEYS = (
    "hypervisor_hostname", "hypervisor_type", "hypervisor_version", "vcpus", "vcpus_used",
    "memory_mb", "memory_mb_used", "disk_total", "disk_used", "disk_available", "cpu_info",
    "ipl_time",
)  # fmt: skip
NIC_COUNTERS = (  # libvirt's interfaceStats, in its order
    "rx_bytes", "rx_packets", "rx_errs", "rx_drop", "tx_bytes", "tx_packets", "tx_errs", "tx_drop",
)  # fmt: skip


def nic_xml(nic: dict[str, Any]) -> str:
    """A NIC on a Linux bridge as libvirt takes it (``{"bridge", "mac_addr"}``)."""
    iface = ET.Element("interface", type="bridge")
    ET.SubElement(iface, "source", bridge=str(nic["bridge"]))
    ET.SubElement(iface, "mac", address=str(nic["mac_addr"]))
    ET.SubElement(iface, "model", type="virtio")
    return ET.tostring(iface, encoding="unicode")


def power_state_of(state: int) -> str:
    """libvirt's domain state as the API's power state: "on", "paused" or "off"."""
    if state in _ON:
        return "on"
    if state in _PAUSED:
        return "paused"
    return "off"


class Guests(GuestRecords):
    """The guests of one node. ``virtman`` is its ``Virtman`` (snapshots and the journal);
    ``connections(image)`` gives an image's connection dict(s) for ``Virtman.create``."""

    def __init__(
        self,
        virtman: Any,
        vms: VirtualMachines,
        *,
        connections: Connections,
        console_dir: Path,
        kernel: str | None,
        initrd: str | None,
        cmdline: str,
        name_prefix: str = "guest-",
        state_dir: Path | None = None,
        migration_settings: migration.Settings | None = None,
    ) -> None:
        super().__init__(virtman.journal, name_prefix)
        self.virtman = virtman
        self.vms = vms
        self.connections = connections
        self.console_dir = console_dir
        self.kernel, self.initrd, self.cmdline = kernel, initrd, cmdline
        self.state_dir = state_dir or console_dir
        self.migration = migration_settings or migration.Settings(vms.uri, "127.0.0.1")
        self._vms_lock = threading.Lock()  # VirtualMachines opens its connection lazily
        self._orphans: builtins.list[str] = []

    def _domain(self, uid: str) -> libvirt.virDomain | None:
        with self._vms_lock:
            return self.vms.domain(self.instance_name(uid))

    def _deployed(self, uid: str) -> tuple[dict[str, Any], libvirt.virDomain]:
        record = self._record(uid)
        if not record.get("disk"):
            raise GuestStateError(uid, "no disk deployed yet (deploy an image first)")
        dom = self._domain(uid)
        if dom is None:  # undefined behind our back: defined again from the record
            LOG.warning("guest %s: its domain is gone: defined again (%s)", uid, record["disk"])
            self._define(uid, record)
            dom = self._domain(uid)
            if dom is None:
                raise GuestStateError(uid, "its domain cannot be defined again")
        return record, dom

    def _console(self, uid: str) -> Path:
        return self.console_dir / f"{self.instance_name(uid)}.log"

    # -- the API -----------------------------------------------------------------------------
    def deploy(self, userid: str, image: str) -> None:
        """The guest's root disk becomes a VMThunder snapshot of ``image`` and its domain is
        defined on it (not started). ``GuestStateError`` if it has a disk already."""
        with self._locked(userid) as uid:
            record = self._record(uid)
            if record.get("disk") or record.get("deploying"):
                raise GuestStateError(uid, f"deployed already (image {record.get('image')})")
            name = validation.image_name(image)
            if not (self.kernel and self.initrd):
                raise GuestStateError(uid, "guest_kernel and guest_initrd are not configured")
            connections = self.connections(name)
            instance = self.instance_name(uid)
            # Recorded first: a crash in between leaves a record adopt() can undo.
            record = self._save(uid, record, deploying=name)
            code, info = result_of(self.virtman.create(instance, name, connections, None))
            if code != 0:
                self._save(uid, record, deploying=None)
                raise VirtmanError(f"deploy of {uid}: the snapshot of {name} failed: {info}")
            try:
                self._define(uid, {**record, "disk": info})
            except BaseException:
                self.virtman.destroy(instance)
                self._save(uid, record, deploying=None)
                raise
            self._save(uid, record, deploying=None, image=name, disk=info, state="off")
        LOG.info("guest %s deployed from %s on %s", uid, name, info)

    def _xml(self, uid: str, record: dict[str, Any]) -> str:
        disk = Path(record["disk"])
        is_block = disk.exists() and stat.S_ISBLK(disk.stat().st_mode)
        with self._vms_lock:
            xml = self.vms.render(  # a block disk's source is set below (render wants a file)
                self.instance_name(uid),
                str(self.kernel) if is_block else disk,
                kernel=str(self.kernel),
                initrd=str(self.initrd),
                cmdline=self.cmdline,
                memory_mib=int(record["memory_mb"]),
                console_log=self._console(uid),
                disk_format="raw" if is_block else "qcow2",
            )
        root = ET.fromstring(xml)  # noqa: S314 (rendered by us)
        vcpu = root.find("vcpu")
        if vcpu is not None:
            vcpu.text = str(record["vcpus"])
        on_reboot = root.find("on_reboot")
        if on_reboot is not None:
            on_reboot.text = "restart"  # a guest reboots (the demo's VMs stop instead)
        devices = root.find("devices")
        for nic in record.get("nics") or []:
            if devices is not None:
                devices.append(ET.fromstring(nic_xml(nic)))  # noqa: S314 (ours)
        source_disk = root.find("devices/disk")
        if is_block and source_disk is not None:  # dm driver: /dev/mapper/snapshot_<vm>
            source_disk.set("type", "block")
            source = source_disk.find("source")
            if source is not None:
                source.attrib.clear()
                source.set("dev", str(disk))
        return ET.tostring(root, encoding="unicode")

    def _define(self, uid: str, record: dict[str, Any]) -> None:
        self.console_dir.mkdir(parents=True, exist_ok=True)
        xml = self._xml(uid, record)
        with self._vms_lock:
            self.vms.define(self.instance_name(uid), xml)

    def start(self, userid: str) -> None:
        with self._locked(userid) as uid:
            record, dom = self._deployed(uid)
            if not dom.isActive():
                self._call(uid, "start", dom.create)
            self._save(uid, record, state="on")
        LOG.info("guest %s started", uid)

    def stop(self, userid: str) -> None:
        """Power off at once (z/VM's stop: no shutdown signal)."""
        with self._locked(userid) as uid:
            record, dom = self._deployed(uid)
            self._force_off(uid, dom)
            self._save(uid, record, state="off")
        LOG.info("guest %s stopped", uid)

    def softstop(
        self, userid: str, *, timeout_s: float = 300.0, poll_interval_s: float = 10.0
    ) -> None:
        """ACPI shutdown; after ``timeout_s`` without it the guest is powered off."""
        check_softstop(timeout_s, poll_interval_s)
        with self._locked(userid) as uid:
            record, dom = self._deployed(uid)
            if dom.isActive():
                with contextlib.suppress(libvirt.libvirtError):  # may be stopping already
                    dom.shutdown()
                try:
                    wait_until(
                        lambda: not dom.isActive(),
                        timeout_s=timeout_s,
                        what=f"guest {uid} to shut down",
                        interval_s=min(max(poll_interval_s, 0.05), 1.0),
                        max_interval_s=max(poll_interval_s, 0.05),
                    )
                    LOG.info("guest %s shut down", uid)
                except Timeout:
                    LOG.warning("guest %s did not shut down in %g s: powered off", uid, timeout_s)
                    self._force_off(uid, dom)
            self._save(uid, record, state="off")

    def pause(self, userid: str) -> None:
        with self._locked(userid) as uid:
            record, dom = self._deployed(uid)
            self._running(uid, dom, "pause")
            if dom.state()[0] not in _PAUSED:
                self._call(uid, "pause", dom.suspend)
            self._save(uid, record, state="paused")

    def unpause(self, userid: str) -> None:
        with self._locked(userid) as uid:
            record, dom = self._deployed(uid)
            self._running(uid, dom, "unpause")
            if dom.state()[0] in _PAUSED:
                self._call(uid, "unpause", dom.resume)
            self._save(uid, record, state="on")

    def capture(self, userid: str, image: str) -> dict[str, Any]:
        """The guest's disk flattened into the new image ``volume-<image>`` exported by this
        node (``Virtman.capture_image``). A running guest is paused for the copy (the
        capture's quiesce contract) and resumed after it, also when the capture fails."""
        with self._locked(userid) as uid:
            _, dom = self._deployed(uid)
            pause = bool(dom.isActive()) and dom.state()[0] not in _PAUSED
            if pause:
                self._call(uid, "pause for capture", dom.suspend)
            try:
                captured = self.virtman.capture_image(self.instance_name(uid), image)
            finally:
                if pause:
                    self._call(uid, "resume after capture", dom.resume)
            LOG.info("guest %s: captured into %s (%d bytes)", uid, captured.image, captured.size)
            return captured.as_dict()

    def set_nics(
        self, userid: str, nics: builtins.list[dict[str, Any]], *, live: bool = False
    ) -> None:
        """The guest's NICs become ``nics`` (``[{"vdev", "bridge", "mac_addr"}]``): recorded,
        and the ones added or removed attached to or detached from its domain's definition
        (a guest not deployed yet gets them at deploy); with ``live`` a running guest
        changes at once too. A step libvirt refuses undoes the ones before it: nothing
        changed, ``VMError``/``GuestStateError`` naming it."""
        with self._locked(userid) as uid:
            record = self._record(uid)
            old = {n["vdev"]: n for n in record.get("nics") or []}
            new = {n["vdev"]: n for n in nics}
            dom = self._domain(uid) if record.get("disk") else None
            if dom is not None:
                flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
                if live and dom.isActive():
                    flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
                steps = [
                    (dom.detachDeviceFlags, dom.attachDeviceFlags, old[v])
                    for v in sorted(old.keys() - new.keys())
                ] + [
                    (dom.attachDeviceFlags, dom.detachDeviceFlags, new[v])
                    for v in sorted(new.keys() - old.keys())
                ]
                done: builtins.list[tuple[Callable[[str, int], Any], str]] = []
                try:
                    for do, undo, nic in steps:
                        xml = nic_xml(nic)
                        self._call(uid, f"NIC {nic['vdev']}", functools.partial(do, xml, flags))
                        done.append((undo, xml))
                except VirtmanError:
                    for undo, xml in reversed(done):
                        with contextlib.suppress(libvirt.libvirtError):
                            undo(xml, flags)
                    raise
            self._save(uid, record, nics=list(new.values()))
        LOG.info("guest %s: NICs %s", uid, ", ".join(sorted(new)) or "none")

    def reboot(self, userid: str) -> None:
        """Ask the guest's OS to reboot (ACPI; libvirt's default method)."""
        with self._locked(userid) as uid:
            _, dom = self._deployed(uid)
            self._running(uid, dom, "reboot")
            self._call(uid, "reboot", lambda: dom.reboot(0))
        LOG.info("guest %s rebooting", uid)

    def reset(self, userid: str) -> None:
        """Reset the guest's virtual machine at once (like pressing its reset button)."""
        with self._locked(userid) as uid:
            _, dom = self._deployed(uid)
            self._running(uid, dom, "reset")
            self._call(uid, "reset", lambda: dom.reset(0))
        LOG.info("guest %s reset", uid)

    def power_state(self, userid: str) -> str:
        uid = validate_userid(userid)
        record = self._record(uid)
        dom = self._domain(uid) if record.get("disk") else None
        return "off" if dom is None else power_state_of(self._call(uid, "state", dom.state)[0])

    def info(self, userid: str) -> dict[str, Any]:
        uid = validate_userid(userid)
        record = self._record(uid)
        dom = self._domain(uid) if record.get("disk") else None
        if dom is None:
            return {
                "power_state": "off",
                "max_mem_kb": record["memory_mb"] * 1024,
                "mem_kb": 0,
                "num_cpu": record["vcpus"],
                "cpu_time_us": 0,
            }
        state, max_kb, mem_kb, vcpus, cpu_ns = self._call(uid, "info", dom.info)
        return {
            "power_state": power_state_of(state),
            "max_mem_kb": max_kb,
            "mem_kb": mem_kb if power_state_of(state) != "off" else 0,
            "num_cpu": vcpus,
            "cpu_time_us": cpu_ns // 1000,
        }

    def definition(self, userid: str) -> str:
        uid = validate_userid(userid)
        _, dom = self._deployed(uid)
        xml: str = self._call(uid, "definition", lambda: dom.XMLDesc(0))
        return xml

    def stats(self, userid: str) -> dict[str, Any]:
        """CPU times (ns), memory counters (KiB) and per-NIC counters; empty while off."""
        uid = validate_userid(userid)
        _, dom = self._deployed(uid)
        if not dom.isActive():
            return {"cpu": {}, "mem": {}, "nics": []}
        cpu = self._call(uid, "stats", lambda: dom.getCPUStats(True))
        mem = self._call(uid, "stats", dom.memoryStats)
        root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 (libvirt's XML)
        nics = []
        for iface in root.findall("devices/interface"):
            target, mac = iface.find("target"), iface.find("mac")
            if target is None or not target.get("dev"):
                continue
            dev = str(target.get("dev"))
            counters = self._call(uid, "stats", functools.partial(dom.interfaceStats, dev))
            nics.append(
                {
                    "vdev": target.get("dev"),
                    "mac": None if mac is None else mac.get("address"),
                    **dict(zip(NIC_COUNTERS, counters, strict=True)),
                }
            )
        return {"cpu": dict(cpu[0]) if cpu else {}, "mem": dict(mem), "nics": nics}

    def console_output(self, userid: str) -> str:
        """The last MiB of the guest's serial console (since its last start)."""
        uid = validate_userid(userid)
        self._record(uid)
        path = self._console(uid)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - CONSOLE_MAX_BYTES))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def delete(self, userid: str) -> None:
        """Power off, undefine, release the snapshot, forget. ``GuestNotFound`` if unknown."""
        with self._locked(userid) as uid:
            self._remove(uid, self._record(uid), "delete")
        LOG.info("guest %s deleted", uid)

    def _remove(self, uid: str, record: dict[str, Any], what: str) -> None:
        """Power off and undefine the guest's domain (none: nothing to do), release its
        snapshot, forget its console and record; ``VirtmanError`` naming ``what`` if the
        snapshot cannot be released."""
        instance = self.instance_name(uid)
        with self._vms_lock:
            self.vms.destroy(instance)
        if record.get("disk") or record.get("deploying"):
            code, info = result_of(self.virtman.destroy(instance))
            if code == 2:
                raise VirtmanError(f"{what} of {uid}: releasing its snapshot failed: {info}")
        self._console(uid).unlink(missing_ok=True)
        self.journal.drop(KIND, uid)

    # -- live migration --------------------------------------------------------------------------
    def prepare_incoming(
        self, userid: str, vcpus: int, memory_mb: int, image: str
    ) -> dict[str, str]:
        """Join ``image``'s tree (this node's own stack) and make a new, empty snapshot for
        a guest about to arrive by migration; what its source needs (``Incoming``).
        ``GuestExists`` if the guest is recorded here; on any failure nothing is left."""
        uid = validate_userid(userid)
        name = validation.image_name(image)
        record = {
            "userid": uid,
            "instance": self.instance_name(uid),
            "vcpus": integer("vcpus", vcpus, 1, MAX_VCPUS),
            "memory_mb": integer("memory_mb", memory_mb, *MEMORY_MB),
            "disk_gb": 0,
            "image": None,
            "disk": None,
            "state": "off",
            "incoming": True,
        }
        if not (self.kernel and self.initrd):
            raise GuestStateError(uid, "guest_kernel and guest_initrd are not configured")
        instance = self.instance_name(uid)
        with self._locked(uid):
            if uid in self.journal.records(KIND):
                raise GuestExists(uid)
            # Recorded first: a crash in between leaves a record adopt() removes.
            record = self._save(uid, record, deploying=name)
            try:
                code, info = result_of(
                    self.virtman.create(instance, name, self.connections(name), None)
                )
                if code != 0:
                    raise VirtmanError(f"incoming {uid}: the snapshot of {name} failed: {info}")
            except BaseException:
                self.journal.drop(KIND, uid)
                raise
            self._save(uid, record, deploying=None, image=name, disk=info, state="incoming")
            self.console_dir.mkdir(parents=True, exist_ok=True)
        LOG.info("guest %s: ready to arrive from another node on %s", uid, info)
        return migration.Incoming(
            domain=self.vms.domain_name(instance),
            disk=info,
            console=str(self._console(uid)),
            kernel=str(self.kernel),
            initrd=str(self.initrd),
            libvirt_uri=self.migration.uri,
            host=self.migration.host,
        ).as_dict()

    def migrate(self, userid: str, incoming: Any) -> dict[str, Any]:
        """Live-migrate a running guest to the node that answered ``incoming``
        (``prepare_incoming``), then release it here (domain, snapshot, record); the
        migration's figures. On a failure the guest runs on here as before (``VMError``)."""
        plan = migration.Incoming.parse(incoming)
        with self._locked(userid) as uid:
            record, dom = self._deployed(uid)
            if record.get("incoming"):
                raise GuestStateError(uid, "it is arriving here, not leaving")
            self._running(uid, dom, "migrate")
            disk = Path(record["disk"])
            if disk.exists() and stat.S_ISBLK(disk.stat().st_mode):
                raise GuestStateError(uid, "live migration needs a file disk (the qemu driver)")
            if dom.name() != plan.domain:
                raise GuestStateError(
                    uid, f"the destination expects domain {plan.domain}, here it is "
                    f"{dom.name()}: the nodes' guest_name_prefix differ",
                )  # fmt: skip
            xml = self._call(
                uid, "migratable XML", lambda: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
            )
            xml = migration.destination_xml(xml, record["disk"], plan)
            LOG.info("guest %s: migrating to %s (%s)", uid, plan.libvirt_uri, plan.disk)
            try:
                figures = migration.migrate(
                    dom, plan, xml,
                    timeout_s=self.migration.timeout_s,
                    bandwidth_mib_s=self.migration.bandwidth_mib_s,
                )  # fmt: skip
            except libvirt.libvirtError as err:
                LOG.warning("guest %s: migration failed, it runs on here: %s", uid, err)
                raise VMError(f"guest {uid}: migration failed, it runs on here: {err}") from err
            LOG.info("guest %s: migrated to %s: %s", uid, plan.libvirt_uri, figures)
            return {**figures, **self._release(uid)}

    def _release(self, uid: str) -> dict[str, str]:
        """What stays of a guest that left: its domain (shut off), its snapshot (and its
        stack when no other instance uses it), its console and record, removed. Failures
        are logged and answered (the guest runs elsewhere now)."""
        instance = self.instance_name(uid)
        errors = []
        try:
            with self._vms_lock:
                self.vms.destroy(instance)
        except VirtmanError as err:
            errors.append(f"undefine: {err}")
        code, info = result_of(self.virtman.destroy(instance))
        if code == 2:
            errors.append(f"snapshot: {info}")
        self._console(uid).unlink(missing_ok=True)
        self.journal.drop(KIND, uid)
        if errors:
            LOG.warning("guest %s left, but here: %s", uid, "; ".join(errors))
            return {"source_cleanup_error": "; ".join(errors)}
        return {}

    def finish_incoming(self, userid: str) -> None:
        """Record a guest that arrived by migration as running here."""
        with self._locked(userid) as uid:
            record = self._record(uid)
            if not record.get("incoming"):
                raise GuestStateError(uid, "it is not arriving by migration")
            dom = self._domain(uid)
            if dom is None or not dom.isActive():
                raise GuestStateError(uid, "its migrated domain does not run here")
            self._save(uid, record, incoming=False, state="on")
        LOG.info("guest %s arrived by migration", uid)

    def abort_incoming(self, userid: str) -> str:
        """Undo ``prepare_incoming`` after a failed migration: "removed" (nothing of it is
        left here), "running" (it did arrive: kept) or "kept" (a guest of this node, not
        an incoming one: untouched)."""
        with self._locked(userid) as uid:
            record = self.journal.records(KIND).get(uid)
            if record is None:
                return "removed"
            if not record.get("incoming"):
                return "kept"
            dom = self._domain(uid)
            if dom is not None and dom.isActive():
                return "running"
            self._undo_incoming(uid, record)
        return "removed"

    def _undo_incoming(self, uid: str, record: dict[str, Any]) -> None:
        self._remove(uid, record, "undoing the arrival")
        LOG.info("guest %s: its arrival was undone (nothing left)", uid)

    def host_info(self) -> dict[str, Any]:
        """What z/VM's host_get_info gives, for this Linux/KVM host (disk in GB, memory in
        MB, the state_dir's file system as the disk pool)."""
        with self._vms_lock:
            conn = self.vms.connection()
        try:
            model, memory_mb, cpus, mhz, *_ = conn.getInfo()
            free_mb = conn.getFreeMemory() // (1 << 20)
            hv_type = conn.getType()
            hv_version = conn.getVersion()
            hostname = conn.getHostname()
            vcpus_used = sum(d.info()[3] for d in conn.listAllDomains(1))  # active
        except libvirt.libvirtError as err:
            raise VMError(f"host info: {err}") from err
        disk = shutil.disk_usage(self.state_dir)
        return {
            "hypervisor_hostname": hostname,
            "hypervisor_type": hv_type.lower(),
            "hypervisor_version": hv_version,
            "vcpus": cpus,
            "vcpus_used": vcpus_used,
            "memory_mb": memory_mb,
            "memory_mb_used": max(0, memory_mb - free_mb),
            "disk_total": disk.total >> 30,
            "disk_used": disk.used >> 30,
            "disk_available": disk.free >> 30,
            "cpu_info": {"architecture": model, "cpus": cpus, "mhz": mhz},
            "ipl_time": time.strftime("IPL at %m/%d/%y %H:%M:%S UTC", time.gmtime(boot_time())),
        }

    # -- restart -------------------------------------------------------------------------------
    def adopt(self) -> None:
        """Take over what the journal and libvirt hold (at every start). Nothing running is
        restarted or destroyed; see the module's docstring."""
        records = self.journal.records(KIND)
        with self._vms_lock:
            domains = {i.instance: i for i in self.vms.list()}
        adopted = []
        for uid, record in sorted(records.items()):
            instance = self.instance_name(uid)
            info = domains.get(instance)
            if record.get("incoming"):
                if info is not None and info.active:
                    LOG.warning("guest %s: arrived by migration while we were down", uid)
                    self._save(uid, record, incoming=False, state="on")
                    adopted.append(f"{uid}(on)")
                else:
                    LOG.warning("guest %s: its migration never arrived: undone", uid)
                    self._undo_incoming(uid, record)
                continue
            if record.get("deploying") and not record.get("disk"):
                self._finish_deploy(uid, record, info is not None)
                continue
            if not record.get("disk"):
                continue
            if info is None:
                LOG.warning("guest %s: its domain is gone: defined again (%s)", uid, record["disk"])
                try:
                    self._define(uid, record)
                except (VirtmanError, OSError) as err:
                    LOG.error("guest %s: cannot define its domain again: %s", uid, err)
                self._save(uid, record, state="off")
                continue
            now = "paused" if info.state == "paused" else ("on" if info.active else "off")
            if now != record.get("state"):
                LOG.warning("guest %s: asked to be %s, found %s", uid, record.get("state"), now)
                self._save(uid, record, state=now)
            adopted.append(f"{uid}({now})")
        mine = {self.instance_name(u) for u in records}
        self._orphans = sorted(
            i for i in domains if i.startswith(self.name_prefix) and i not in mine
        )
        for instance in self._orphans:
            LOG.warning(
                "orphan: domain %s is ours (virtman's metadata, prefix %s) but no guest is "
                "recorded for it: left as it is (not destroyed)",
                domains[instance].domain,
                self.name_prefix,
            )
        LOG.info(
            "guests adopted: %s; orphans: %s",
            ", ".join(adopted) or "none",
            ", ".join(self._orphans) or "none",
        )

    def _finish_deploy(self, uid: str, record: dict[str, Any], defined: bool) -> None:
        """A deploy the daemon died in: kept if its domain was defined, else undone."""
        instance = self.instance_name(uid)
        disks = {e.split(":")[0]: e for e in self.virtman.list()}
        if defined and instance in disks:
            disk = self.virtman.journal.instances().get(instance, {}).get("path")
            if disk:
                LOG.warning("guest %s: its interrupted deploy had finished: kept", uid)
                self._save(
                    uid, record, deploying=None, image=record["deploying"], disk=disk, state="off"
                )
                return
        LOG.warning("guest %s: its deploy was interrupted: undone", uid)
        with self._vms_lock:
            self.vms.destroy(instance)
        if instance in disks:
            self.virtman.destroy(instance)
        self._save(uid, record, deploying=None)

    def orphans(self) -> builtins.list[str]:
        """Instances of domains of ours (prefix + metadata) with no guest record, as found by
        the last ``adopt`` or now if libvirt answers; never destroyed."""
        with contextlib.suppress(VirtmanError):
            with self._vms_lock:
                found = {i.instance for i in self.vms.list()}
            mine = {self.instance_name(u) for u in self.journal.records(KIND)}
            self._orphans = sorted(
                i for i in found if i.startswith(self.name_prefix) and i not in mine
            )
        return list(self._orphans)

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _call(uid: str, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                raise GuestStateError(uid, f"{what}: {err.get_error_message()}") from err
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise GuestStateError(uid, f"{what}: its domain is gone") from err
            raise VMError(f"guest {uid}: {what}: {err}") from err

    @staticmethod
    def _running(uid: str, dom: libvirt.virDomain, what: str) -> None:
        if not dom.isActive():
            raise GuestStateError(uid, f"cannot {what}: it is off")

    @staticmethod
    def _force_off(uid: str, dom: libvirt.virDomain) -> None:
        try:
            dom.destroy()
        except libvirt.libvirtError as err:
            code = err.get_error_code()
            if code not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                raise VMError(f"guest {uid}: power off: {err}") from err
