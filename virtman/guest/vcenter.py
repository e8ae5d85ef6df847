"""The VMs of a vSphere cluster, through oslo.vmware: the libvirt backend's verbs on vCenter.

``VCenterMachines`` mirrors ``virtman.guest.domains.VirtualMachines`` (``boot``, ``info``,
``list``, ``start``, ``stop``, ``destroy``, ``close``) with the calls of seed 001:
``VMwareAPISession``, inventory reads through ``vim_util``, ``Folder.CreateVM_Task`` with a
``VirtualMachineConfigSpec``, ``SearchIndex.FindByUuid``, ``PowerOnVM_Task``,
``PowerOffVM_Task``, ``Destroy_Task``.

- Ours: every VM it creates is named ``<prefix><instance>`` and carries the extraConfig key
  ``vmthunder.instance`` (and an annotation saying so); nothing else is ever touched.
  ``list``/``orphans`` report exactly those, so a restarted node can find and clean them.
- Undo: a ``boot`` that fails after ``CreateVM_Task`` destroys what it created; a failed
  ``CreateVM_Task`` is followed by a look-up of that name, and a VM of ours left by it is
  destroyed too. The error names the call that failed.
- Look-ups: ``FindByUuid`` with ``instanceUuid=True``. The seed uses ``FindAllByUuid``;
  govmomi's simulator does not implement it, and an instance UUID is unique in one vCenter.
- Inventory walk: ``get_object_property`` from ``rootFolder`` down, not ``vim_util.get_objects``
  (its resource-pool traversal specs overflow the simulator's stack).
- Placement: the first cluster's root resource pool (a standalone host's if there is no
  cluster), vCenter (DRS) picks the host; ``hosts`` reports that compute resource's hosts,
  which is the capacity the cluster API places on (this node is one node to it).
- Disks: every VM gets a paravirtual SCSI controller at creation; ``rdm_change`` builds the
  device spec of the VMThunder disk on it (the node's iSCSI export as a raw device mapping,
  ``virtman.guest.vcenter_rdm``). Applying it is the ESXi host seam's job
  (``virtman.guest.vcenter_guests``): govmomi's simulator cannot hold an RDM disk.
"""

from __future__ import annotations

import builtins
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oslo_vmware import api, vim_util
from oslo_vmware import exceptions as vexc

from brick.closing import Closing
from virtman.errors import HypervisorError, HypervisorUnreachable, InstanceExists, InstanceNotFound
from virtman.guest import vimwsdl
from virtman.guest.domains import DEFAULT_PREFIX, InvalidVMInput, validate_instance
from virtman.guest.vcenter_rdm import rdm_disk_change

LOG = logging.getLogger(__name__)

TAG_KEY = "vmthunder.instance"
GUEST_ID = "otherLinux64Guest"
STATES = {"poweredOn": "running", "poweredOff": "shutoff", "suspended": "paused"}


class VCenterError(HypervisorError):
    """vCenter refused or failed a call; the message names the call."""


class VCenterUnreachable(VCenterError, HypervisorUnreachable):
    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint, self.reason = endpoint, reason
        super().__init__(f"vCenter at {endpoint} unreachable: {reason}")


class VCenterLoginFailed(VCenterError):
    def __init__(self, endpoint: str, username: str) -> None:
        self.endpoint, self.username = endpoint, username
        super().__init__(f"vCenter at {endpoint} refused the login of {username!r}")


class VCenterObjectGone(VCenterError):
    """An inventory object vanished between two calls (destroyed meanwhile)."""


class VCenterTaskFailed(VCenterError):
    def __init__(self, call: str, target: str, reason: str) -> None:
        self.call, self.target, self.reason = call, target, reason
        super().__init__(f"vCenter {call} for {target} failed: {reason}")


@dataclass(frozen=True)
class VCenterSettings:
    """The ``[vcenter]`` options, checked (``from_conf``)."""

    host: str
    username: str
    password: str
    port: int = 443
    scheme: str = "https"
    ca_file: str | None = None
    insecure: bool = False
    wsdl_location: str | None = None
    generate_wsdl: bool = False
    datastore: str | None = None
    api_retry_count: int = 3
    task_poll_interval: float = 0.2

    def __post_init__(self) -> None:
        for field in ("host", "username", "password"):
            if not getattr(self, field):
                raise InvalidVMInput(f"vcenter.{field}", getattr(self, field), "must be set")
        if self.scheme == "http" and not _loopback(self.host):
            raise InvalidVMInput("vcenter.scheme", self.scheme, "http only to a loopback host")

    @classmethod
    def from_conf(cls, group: Any) -> VCenterSettings:
        return cls(
            host=group.host,
            username=group.username,
            password=group.password,
            port=group.port,
            scheme=group.scheme,
            ca_file=group.ca_file,
            insecure=group.insecure,
            wsdl_location=group.wsdl_location,
            generate_wsdl=group.generate_wsdl,
            datastore=group.datastore,
            api_retry_count=group.api_retry_count,
            task_poll_interval=group.task_poll_interval,
        )

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class VCenterVMInfo:
    """What vCenter reports of one of our VMs (read live, never cached)."""

    instance: str
    domain: str  # the VM's name in vCenter
    uuid: str  # config.instanceUuid
    state: str  # a value of STATES
    moref: str

    @property
    def active(self) -> bool:
        return self.state != "shutoff"


@dataclass(frozen=True)
class VCenterHost:
    """One ESXi host of the compute resource VMs are placed in (read live)."""

    name: str
    cpu_threads: int
    memory_mb: int
    memory_mb_used: int
    connected: bool


@dataclass(frozen=True)
class _Inventory:
    datacenter: Any
    vm_folder: Any
    compute: Any
    pool: Any
    datastore: str


class VCenterMachines(Closing):
    """Our VMs in one vCenter: one session, opened at construction (``VCenterLoginFailed``,
    ``VCenterUnreachable``, ``InvalidVMInput`` for a datastore it lacks), closed by ``close``."""

    def __init__(
        self, settings: VCenterSettings, *, prefix: str = DEFAULT_PREFIX, state_dir: Path
    ) -> None:
        self.settings, self.prefix = settings, prefix
        wsdl = settings.wsdl_location
        if not wsdl and settings.generate_wsdl:
            wsdl = vimwsdl.write(state_dir / "vimService.wsdl")
        self._session = api.VMwareAPISession(
            settings.host,
            settings.username,
            settings.password,
            settings.api_retry_count,
            settings.task_poll_interval,
            scheme=settings.scheme,
            port=settings.port,
            wsdl_loc=wsdl,
            cacert=settings.ca_file,
            insecure=settings.insecure,
            create_session=False,
        )
        try:
            # One unretried call first: oslo.vmware retries a login that cannot connect
            # forever (oslo.service's RetryDecorator without a count), so it runs only once
            # vCenter has answered.
            about = self._session.vim.service_content.about
            LOG.debug("vCenter at %s is %s", settings.endpoint, about.fullName)
            self._session._create_session()  # the login, as create_session=True would do
        except (vexc.VimConnectionException, OSError) as err:  # OSError: fetching the WSDL
            raise VCenterUnreachable(settings.endpoint, str(err)) from err
        except vexc.VimFaultException as err:
            if "InvalidLogin" in (err.fault_list or []):
                raise VCenterLoginFailed(settings.endpoint, settings.username) from err
            raise VCenterError(f"vCenter at {settings.endpoint}: Login: {err}") from err
        except vexc.VMwareDriverException as err:
            raise VCenterError(f"vCenter at {settings.endpoint}: Login: {err}") from err
        self._inventory: _Inventory | None = None
        try:
            self._inv()  # a bad [vcenter] datastore, or no datacenter, fails here
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"VCenterMachines({self.settings.endpoint!r})"

    def close(self) -> None:
        with contextlib.suppress(vexc.VMwareDriverException):
            self._session.logout()

    def domain_name(self, instance: str) -> str:
        return f"{self.prefix}{validate_instance(instance)}"

    # -- calls ------------------------------------------------------------------------------
    def _call(self, what: str, module: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._session.invoke_api(module, method, *args, **kwargs)
        except vexc.VimConnectionException as err:
            raise VCenterUnreachable(self.settings.endpoint, f"{what}: {err}") from err
        except vexc.VMwareDriverException as err:
            if _gone(err):
                raise VCenterObjectGone(f"vCenter {what}: the object vanished: {err}") from err
            raise VCenterError(f"vCenter {what} failed: {err}") from err

    def call(self, method: str, moref: Any, **kwargs: Any) -> Any:
        """One vSphere method on ``moref`` over this session (errors as ``_call``)."""
        return self._call(method, self._session.vim, method, moref, **kwargs)

    def prop(self, moref: Any, name: str) -> Any:
        """One property of ``moref``, read live."""
        return self._prop(moref, name)

    def task(self, method: str, target: str, moref: Any, **kwargs: Any) -> Any:
        """A ``*_Task`` method, waited for; ``VCenterTaskFailed`` names it and ``target``."""
        return self._task(method, target, moref, **kwargs)

    @property
    def factory(self) -> Any:
        """The suds factory of this session's data objects (``ns0:<type>``)."""
        return self._session.vim.client.factory

    def _prop(self, moref: Any, name: str) -> Any:
        return self._call(f"reading {name}", vim_util, "get_object_property",
                          self._session.vim, moref, name)  # fmt: skip

    def _run_task(self, call: str, target: str, start: Callable[[], Any]) -> Any:
        task = start()
        try:
            return getattr(self._session.wait_for_task(task), "result", None)
        except vexc.VimConnectionException as err:
            raise VCenterUnreachable(self.settings.endpoint, f"{call}: {err}") from err
        except vexc.VMwareDriverException as err:
            raise VCenterTaskFailed(call, target, str(err)) from err

    def _task(self, call: str, target: str, moref: Any, **kwargs: Any) -> Any:
        vim = self._session.vim
        return self._run_task(call, target, lambda: self._call(call, vim, call, moref, **kwargs))

    # -- inventory --------------------------------------------------------------------------
    def _inv(self) -> _Inventory:
        if self._inventory is None:
            root = self._session.vim.service_content.rootFolder
            datacenters = [
                m for m in _morefs(self._prop(root, "childEntity")) if m._type == "Datacenter"
            ]
            if not datacenters:
                raise VCenterError(f"vCenter at {self.settings.endpoint} has no datacenter")
            dc = datacenters[0]
            compute = self._placement(dc)
            self._inventory = _Inventory(
                datacenter=dc,
                vm_folder=self._prop(dc, "vmFolder"),
                compute=compute,
                pool=self._prop(compute, "resourcePool"),
                datastore=self._datastore(dc),
            )
        return self._inventory

    def _placement(self, dc: Any) -> Any:
        """The first cluster, else the first standalone host (its compute resource)."""
        children = _morefs(self._prop(self._prop(dc, "hostFolder"), "childEntity"))
        for kind in ("ClusterComputeResource", "ComputeResource"):
            for child in children:
                if child._type == kind:
                    return child
        raise VCenterError(f"vCenter at {self.settings.endpoint} has no cluster or host")

    def hosts(self) -> builtins.list[VCenterHost]:
        """The hosts VMs are placed on, with their size and memory in use, by name."""
        found = []
        for host in _morefs(self._prop(self._inv().compute, "host")):
            summary = self._prop(host, "summary")
            found.append(
                VCenterHost(
                    name=str(summary.config.name),
                    cpu_threads=int(summary.hardware.numCpuThreads),
                    memory_mb=int(summary.hardware.memorySize) >> 20,
                    memory_mb_used=int(getattr(summary.quickStats, "overallMemoryUsage", 0) or 0),
                    connected=str(summary.runtime.connectionState) == "connected",
                )
            )
        return sorted(found, key=lambda h: h.name)

    def host_of(self, instance_name: str) -> str:
        """The name of the ESXi host our VM of that instance is on."""
        vm, _ = self._require(instance_name)
        return str(self._prop(self._prop(vm, "runtime.host"), "name"))

    def _datastore(self, dc: Any) -> str:
        names = [str(self._prop(ds, "name")) for ds in _morefs(self._prop(dc, "datastore"))]
        wanted = self.settings.datastore
        if wanted:
            if wanted not in names:
                raise InvalidVMInput("vcenter.datastore", wanted, f"not in {sorted(names)}")
            return wanted
        if not names:
            raise VCenterError(f"vCenter at {self.settings.endpoint} has no datastore")
        return names[0]

    def _all_vms(self, folder: Any) -> builtins.list[Any]:
        found = []
        for child in _morefs(self._prop(folder, "childEntity")):
            if child._type == "Folder":
                found += self._all_vms(child)
            elif child._type == "VirtualMachine":
                found.append(child)
        return found

    def _describe(self, vm: Any) -> VCenterVMInfo | None:
        """Our VM's live state; None for a VM we did not create (or one gone meanwhile)."""
        try:
            props = self._call("reading a VM", vim_util, "get_object_properties_dict",
                               self._session.vim, vm,
                               ["name", "config.extraConfig", "config.instanceUuid",
                                "runtime.powerState"])  # fmt: skip
        except VCenterObjectGone:
            return None
        extra = props.get("config.extraConfig")
        tags = {o.key: o.value for o in getattr(extra, "OptionValue", [])}
        instance = tags.get(TAG_KEY)
        if instance is None or props.get("name") != self.prefix + str(instance):
            return None
        return VCenterVMInfo(
            instance=str(instance),
            domain=str(props["name"]),
            uuid=str(props["config.instanceUuid"]),
            state=STATES.get(str(props["runtime.powerState"]), "nostate"),
            moref=vm.value,
        )

    def _owned(self, instance: str) -> tuple[Any, VCenterVMInfo] | None:
        for vm in self._all_vms(self._inv().vm_folder):
            info = self._describe(vm)
            if info is not None and info.instance == instance:
                return vm, info
        return None

    # -- verbs ------------------------------------------------------------------------------
    def _config_spec(self, instance: str, vcpus: int, memory_mb: int) -> Any:
        factory = self._session.vim.client.factory
        spec = factory.create("ns0:VirtualMachineConfigSpec")
        spec.name = self.domain_name(instance)
        spec.guestId = GUEST_ID
        spec.numCPUs = vcpus
        spec.memoryMB = memory_mb
        spec.annotation = f"VMThunder instance {instance}: created and destroyed by virtman"
        files = factory.create("ns0:VirtualMachineFileInfo")
        # A fixed path, not a bare "[datastore]": vCenter would pick "<name> (1)" beside a stale
        # directory of that name; this way the stale file fails the task (FileAlreadyExists).
        files.vmPathName = f"[{self._inv().datastore}] {spec.name}/{spec.name}.vmx"
        spec.files = files
        tag = factory.create("ns0:OptionValue")
        tag.key, tag.value = TAG_KEY, instance
        spec.extraConfig = [tag]
        controller = factory.create("ns0:ParaVirtualSCSIController")
        controller.key, controller.busNumber, controller.sharedBus = -101, 0, "noSharing"
        add = factory.create("ns0:VirtualDeviceConfigSpec")
        add.operation, add.device = "add", controller
        spec.deviceChange = [add]  # the RDM disk goes on it (rdm_change)
        return spec

    def rdm_change(self, instance_name: str, device: str) -> Any:
        """The ``deviceChange`` that maps ``device`` (the host's ScsiLun of the node's
        export) into our VM as a physical-mode RDM disk on its SCSI controller."""
        vm, info = self._require(instance_name)
        devices = getattr(self._prop(vm, "config.hardware.device"), "VirtualDevice", [])
        keys = [d.key for d in devices if type(d).__name__ == "ParaVirtualSCSIController"]
        if not keys:
            raise VCenterError(f"{info.domain} has no paravirtual SCSI controller for its disk")
        mapping = f"[{self._inv().datastore}] {info.domain}/{info.domain}-rdm.vmdk"
        return rdm_disk_change(
            self._session.vim.client.factory, device, mapping, controller_key=keys[0]
        )

    def boot(
        self, instance_name: str, *, vcpus: int = 1, memory_mb: int = 256, power_on: bool = True
    ) -> VCenterVMInfo:
        """Create the VM (``CreateVM_Task``) and power it on; on any failure nothing of it is
        left. ``InstanceExists`` if we already have a VM for that instance."""
        instance = validate_instance(instance_name)
        if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= 128:
            raise InvalidVMInput("vcpus", vcpus, "must be an integer in 1..128")
        if (
            not isinstance(memory_mb, int)
            or isinstance(memory_mb, bool)
            or not (4 <= memory_mb <= 4 * 1024 * 1024)
        ):
            raise InvalidVMInput("memory_mb", memory_mb, "must be an integer in 4..4194304")
        if self._owned(instance) is not None:
            raise InstanceExists(instance)
        inv = self._inv()
        spec = self._config_spec(instance, vcpus, memory_mb)
        target = spec.name
        try:
            vm = self._run_task("CreateVM_Task", target, lambda: self._call(
                "CreateVM_Task", self._session.vim, "CreateVM_Task", inv.vm_folder,
                config=spec, pool=inv.pool))  # fmt: skip
        except VCenterError:
            self._undo(instance)  # a VM of ours the failed task may have left
            raise
        try:
            if power_on:
                self._task("PowerOnVM_Task", target, vm)
            info = self._describe(vm)
            if info is None:
                raise VCenterError(f"vCenter lost {target} right after CreateVM_Task")
        except BaseException:
            self._undo(instance)
            raise
        LOG.info("created %s (%s) in vCenter", target, info.uuid)
        return info

    def _undo(self, instance: str) -> None:
        try:
            self.destroy(instance)
        except VCenterError as err:  # keep the first error; the VM is in list()/orphans()
            LOG.error("undo of %s failed, left in vCenter: %s", instance, err)

    def info(self, instance_name: str) -> VCenterVMInfo:
        found = self._owned(validate_instance(instance_name))
        if found is None:
            raise InstanceNotFound(instance_name)
        return found[1]

    def find_by_uuid(self, uuid: str) -> VCenterVMInfo:
        """Our VM of that instance UUID (``FindByUuid``: the simulator lacks
        ``FindAllByUuid``); ``InstanceNotFound`` if vCenter has none, or not one of ours."""
        if not isinstance(uuid, str) or not 1 <= len(uuid) <= 64:
            raise InvalidVMInput("uuid", uuid, "must be a UUID string")
        search = self._session.vim.service_content.searchIndex
        vm = self._call("FindByUuid", self._session.vim, "FindByUuid", search,
                        uuid=uuid, vmSearch=True, instanceUuid=True)  # fmt: skip
        info = self._describe(vm) if vm is not None else None
        if info is None:
            raise InstanceNotFound(uuid)
        return info

    def list(self) -> builtins.list[VCenterVMInfo]:
        """Every VM we created in this vCenter (prefix and tag), by name."""
        found = (self._describe(vm) for vm in self._all_vms(self._inv().vm_folder))
        return sorted((i for i in found if i is not None), key=lambda i: i.domain)

    def orphans(self, known: builtins.list[str]) -> builtins.list[VCenterVMInfo]:
        """Our VMs whose instance is not in ``known`` (the node's journal): to report or clean."""
        wanted = set(known)
        return [i for i in self.list() if i.instance not in wanted]

    def start(self, instance_name: str) -> None:
        vm, info = self._require(instance_name)
        if info.state != "running":  # off, or suspended (powering on resumes it)
            self._task("PowerOnVM_Task", info.domain, vm)

    def stop(self, instance_name: str) -> bool:
        """Power off (hard, as ``PowerOffVM_Task`` is); the VM stays. True: it is off."""
        vm, info = self._require(instance_name)
        if info.active:
            self._task("PowerOffVM_Task", info.domain, vm)
        return True

    def reset(self, instance_name: str) -> None:
        """Hard reset (``ResetVM_Task``) of a VM that is on."""
        vm, info = self._require(instance_name)
        self._task("ResetVM_Task", info.domain, vm)

    def suspend(self, instance_name: str) -> None:
        """``SuspendVM_Task`` of a VM that is on; ``start`` resumes it."""
        vm, info = self._require(instance_name)
        if info.state == "running":
            self._task("SuspendVM_Task", info.domain, vm)

    def destroy(self, instance_name: str) -> None:
        """Power off and ``Destroy_Task``; an instance without a VM is success."""
        found = self._owned(validate_instance(instance_name))
        if found is None:
            return
        vm, info = found
        if info.active:
            self._task("PowerOffVM_Task", info.domain, vm)
        self._task("Destroy_Task", info.domain, vm)
        LOG.info("destroyed %s in vCenter", info.domain)

    def vm_named(self, domain: str) -> Any | None:
        """The moref of our VM called ``domain`` (see ``list``); None if there is none."""
        for vm in self._all_vms(self._inv().vm_folder):
            info = self._describe(vm)
            if info is not None and info.domain == domain:
                return vm
        return None

    def _require(self, instance_name: str) -> tuple[Any, VCenterVMInfo]:
        found = self._owned(validate_instance(instance_name))
        if found is None:
            raise InstanceNotFound(instance_name)
        return found


def _gone(err: vexc.VMwareDriverException) -> bool:
    faults = getattr(err, "fault_list", None) or []
    return isinstance(err, vexc.ManagedObjectNotFoundException) or (
        "ManagedObjectNotFound" in faults
    )


def _morefs(value: Any) -> builtins.list[Any]:
    """The ManagedObjectReference list of an ``ArrayOfManagedObjectReference`` (or [])."""
    return builtins.list(getattr(value, "ManagedObjectReference", []) or [])
