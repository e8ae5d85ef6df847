"""The VMs of a compute node, through libvirt-python.

``VirtualMachines(uri, template)`` boots an instance as the persistent domain
``<prefix><instance>`` (``vmt-`` by default) from ``virtman/guest/domain.xml.template``: direct
kernel boot, one virtio disk (the instance's qcow2 overlay), the serial console written to a
file, no network. Every domain it defines carries a ``<vmt:instance>`` metadata element, and
``list``/``stop``/``destroy`` only ever touch domains with both the prefix and that element.

Choices, from shared/reference/env-vm-boot.md:

- ``<domain type='qemu'>`` (TCG) unless ``kvm=True`` is asked for *and* ``/dev/kvm`` answers
  ``KVM_GET_API_VERSION``; TCG gets ``<tb-cache>`` 64 MiB (§4.5: RSS 600 -> 280 MiB, same
  boot time).
- Permissions (§6.4): the overlay's backing chain can be a FUSE export of
  qemu-storage-daemon, a root-owned 0400 file. The template runs QEMU as root with
  ``<seclabel type='static' model='dac' relabel='no'>``: libvirt chowns nothing (with the
  default ``libvirt-qemu`` user it would chown the FUSE file, and the owner would stay
  changed), and /etc/libvirt is left as it is. QEMU keeps no capabilities
  (``clear_emulator_capabilities``), so a backing file must be readable by its owner, root.
- The backing chain is not written into the XML: libvirt reads it from the qcow2 header
  (``qemu-img create -F raw -b ...`` records the backing format, so nothing is probed).

Every argument is validated before libvirt is contacted (``InvalidVMInput``, a
``ValueError``). libvirt failures raise ``VMError`` with libvirt's message.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import os
import re
import string
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import NotRequired, TypedDict, Unpack
from xml.sax.saxutils import escape

import libvirt

from brick.closing import Closing
from brick.exception import Timeout
from brick.libvirtd import SYSTEM_URI, quiet_libvirt
from brick.wait import wait_until
from virtman.errors import (
    HypervisorError,
    HypervisorUnreachable,
    InstanceExists,
    InstanceNotFound,
    InvalidInput,
)

LOG = logging.getLogger(__name__)

METADATA_NS = "http://vmthunder.org/xmlns/virtman/vm/1.0"
DEFAULT_TEMPLATE = Path(__file__).with_name("domain.xml.template")  # package data
DEFAULT_PREFIX = "vmt-"
DISK_FORMATS = frozenset({"qcow2", "raw"})
DEFAULT_MEMORY_MIB = 128
KVM_DEVICE = "/dev/kvm"
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00); the stable API answers 12
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}")
_CMDLINE_MAX = 2047  # x86 COMMAND_LINE_SIZE is 2048 with the NUL
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)
STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
ET.register_namespace("vmt", METADATA_NS)


class DomainSpec(TypedDict):
    """What ``render`` (and so ``boot``) takes besides the instance and its disk."""

    kernel: Path | str
    initrd: Path | str
    cmdline: str
    console_log: Path | str
    memory_mib: NotRequired[int]
    disk_format: NotRequired[str]


class InvalidVMInput(InvalidInput, ValueError):
    """A bad argument, found before libvirt is contacted."""


class VMError(HypervisorError):
    """libvirt refused or failed."""


class LibvirtUnreachable(VMError, HypervisorUnreachable):
    """No connection to libvirtd (not running, wrong URI, no permission)."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri, self.reason = uri, reason
        super().__init__(f"libvirt at {uri} unreachable: {reason}")


class ForeignDomain(VMError):
    """A domain with our prefix that virtman did not define (no ``vmt:instance`` metadata)."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        super().__init__(f"domain {domain!r} was not defined by virtman: left alone")


@dataclass(frozen=True)
class VMInfo:
    """What libvirt reports of one of our domains (read live, never cached)."""

    instance: str
    domain: str
    uuid: str
    state: str  # a value of STATES
    domain_type: str  # "qemu" (TCG) or "kvm"
    disk_path: Path | None
    console_log: Path | None

    @property
    def active(self) -> bool:
        return self.state not in {"shutoff", "crashed", "nostate"}


# -- validation (pure) -----------------------------------------------------------------------
def validate_instance(value: object) -> str:
    if not isinstance(value, str) or not _INSTANCE.fullmatch(value):
        raise InvalidVMInput("instance_name", value, "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    return value


def _abs_path(value: object, field: str) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise InvalidVMInput(field, value, "must be a path")
    text = os.fspath(value)
    if not isinstance(text, str) or not os.path.isabs(text):
        raise InvalidVMInput(field, value, "must be an absolute path")
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        raise InvalidVMInput(field, value, "must not contain control characters")
    return Path(os.path.normpath(text))


def _existing_file(value: object, field: str) -> Path:
    path = _abs_path(value, field)
    if not path.is_file():
        raise InvalidVMInput(field, value, "must be an existing regular file")
    return path


def kvm_usable(device: str = KVM_DEVICE) -> bool:
    """Whether ``device`` opens read-write and answers the stable KVM API version (12)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def _code(err: libvirt.libvirtError) -> int | None:
    return err.get_error_code()


class VirtualMachines(Closing):
    """Boot, stop, destroy, inspect and list virtman's domains on ``uri``.

    The connection opens on first use (and again if libvirtd restarted); ``close`` it, or use
    the object as a context manager. Not thread-safe: one object per thread.
    """

    def __init__(
        self,
        uri: str = SYSTEM_URI,
        template: Path | str | None = None,
        *,
        kvm: bool = False,
        prefix: str = DEFAULT_PREFIX,
        tb_cache_mib: int = 64,
        vcpus: int = 1,
    ) -> None:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise InvalidVMInput("prefix", prefix, "must match [A-Za-z0-9][A-Za-z0-9._-]{0,15}")
        for field, value, high in (("tb_cache_mib", tb_cache_mib, 4096), ("vcpus", vcpus, 64)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise InvalidVMInput(field, value, f"must be an integer 1-{high}")
        self.uri = uri
        self.prefix = prefix
        self.template_path = _existing_file(template or DEFAULT_TEMPLATE, "template")
        self._template = string.Template(self.template_path.read_text())
        self.tb_cache_mib, self.vcpus = tb_cache_mib, vcpus
        self.domain_type = "kvm" if kvm and kvm_usable() else "qemu"
        if kvm and self.domain_type != "kvm":
            LOG.warning("kvm asked for but %s is not usable: QEMU TCG it is", KVM_DEVICE)
        self._conn: libvirt.virConnect | None = None
        self._fill(  # a broken template fails here, not at the first boot
            instance="check", disk_path="/check", disk_format="raw", kernel="/check",
            initrd="/check", cmdline="", memory_mib=128, console_log="/check",
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"VirtualMachines({self.uri!r}, prefix={self.prefix!r}, type={self.domain_type})"

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def domain_name(self, instance: str) -> str:
        return self.prefix + validate_instance(instance)

    # -- XML -------------------------------------------------------------------------------
    def _fill(self, **values: object) -> str:
        fields = {
            **values,
            "domain_type": self.domain_type,
            "domain_name": self.prefix + str(values["instance"]),
            "metadata_ns": METADATA_NS,
            "vcpus": self.vcpus,
            "tb_cache_mib": self.tb_cache_mib,
            "cpu_mode": "host-passthrough" if self.domain_type == "kvm" else "maximum",
        }
        quoted = {k: escape(str(v), {"'": "&apos;", '"': "&quot;"}) for k, v in fields.items()}
        try:
            root = ET.fromstring(self._template.substitute(quoted))  # noqa: S314 (our file)
        except (KeyError, ValueError, ET.ParseError) as err:
            raise InvalidVMInput("template", str(self.template_path), f"unusable: {err}") from err
        if root.find(f"metadata/{{{METADATA_NS}}}instance") is None:
            raise InvalidVMInput(
                "template", str(self.template_path), f"needs <metadata> with {METADATA_NS}"
            )
        features = root.find("features")
        tcg = None if features is None else features.find("tcg")
        if features is not None and tcg is not None and self.domain_type != "qemu":
            features.remove(tcg)  # libvirt: TCG features need a 'qemu' domain
        return ET.tostring(root, encoding="unicode")

    def render(
        self,
        instance_name: str,
        disk_path: Path | str,
        *,
        kernel: Path | str,
        initrd: Path | str,
        cmdline: str,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        console_log: Path | str,
        disk_format: str = "qcow2",
    ) -> str:
        """The domain XML ``boot`` defines; raises ``InvalidVMInput`` for any bad argument
        (files must exist; the console log's folder must exist)."""
        instance = validate_instance(instance_name)
        disk = _existing_file(disk_path, "disk_path")
        kernel_path = _existing_file(kernel, "kernel")
        initrd_path = _existing_file(initrd, "initrd")
        log = _abs_path(console_log, "console_log")
        if not log.parent.is_dir() or log.is_dir():
            raise InvalidVMInput("console_log", console_log, "must be a file in an existing folder")
        if disk_format not in DISK_FORMATS:
            raise InvalidVMInput(
                "disk_format", disk_format, f"must be one of {sorted(DISK_FORMATS)}"
            )
        if isinstance(memory_mib, bool) or not isinstance(memory_mib, int):
            raise InvalidVMInput("memory_mib", memory_mib, "must be an integer")
        if not 32 <= memory_mib <= 1 << 20:
            raise InvalidVMInput("memory_mib", memory_mib, "must be 32-1048576 (MiB)")
        if not isinstance(cmdline, str) or len(cmdline) > _CMDLINE_MAX:
            raise InvalidVMInput("cmdline", cmdline, f"must be a string of <= {_CMDLINE_MAX}")
        if any(ord(c) < 32 or c == "\x7f" for c in cmdline):
            raise InvalidVMInput("cmdline", cmdline, "must not contain control characters")
        return self._fill(
            instance=instance, disk_path=disk, disk_format=disk_format, kernel=kernel_path,
            initrd=initrd_path, cmdline=cmdline, memory_mib=memory_mib, console_log=log,
        )  # fmt: skip

    # -- libvirt ---------------------------------------------------------------------------
    def _connection(self) -> libvirt.virConnect:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self._conn.isAlive():
                    return self._conn
            self.close()
        quiet_libvirt()
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            raise LibvirtUnreachable(self.uri, err.get_error_message() or str(err)) from err
        return self._conn

    def _lookup(self, instance: str) -> libvirt.virDomain | None:
        try:
            return self._connection().lookupByName(self.domain_name(instance))
        except libvirt.libvirtError as err:
            if _code(err) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise VMError(f"looking up {self.domain_name(instance)}: {err}") from err

    def _ours(self, dom: libvirt.virDomain) -> str | None:
        """The instance name in ``dom``'s metadata, or None if virtman did not define it."""
        if not dom.name().startswith(self.prefix):
            return None
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
        except libvirt.libvirtError as err:
            if _code(err) in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
                return None
            raise VMError(f"reading metadata of {dom.name()}: {err}") from err
        element = ET.fromstring(text)  # noqa: S314 (libvirt's XML)
        return (element.text or "").strip() or None

    def _owned(self, instance: str) -> libvirt.virDomain | None:
        dom = self._lookup(instance)
        if dom is not None and self._ours(dom) != instance:
            raise ForeignDomain(dom.name())
        return dom

    @staticmethod
    def _active(dom: libvirt.virDomain) -> bool:
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError as err:
            if _code(err) == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise

    def _info(self, dom: libvirt.virDomain, instance: str) -> VMInfo:
        try:
            state = dom.state()[0]
            root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 (libvirt's XML)
        except libvirt.libvirtError as err:
            if _code(err) == libvirt.VIR_ERR_NO_DOMAIN:
                raise InstanceNotFound(instance) from err
            raise VMError(f"reading {dom.name()}: {err}") from err
        disk = root.find("devices/disk/source")
        serial = root.find("devices/serial/source")
        disk_file = None if disk is None else disk.get("file")
        log_file = None if serial is None else serial.get("path")
        return VMInfo(
            instance=instance,
            domain=dom.name(),
            uuid=dom.UUIDString(),
            state=STATES.get(state, f"unknown-{state}"),
            domain_type=root.get("type", "?"),
            disk_path=Path(disk_file) if disk_file else None,
            console_log=Path(log_file) if log_file else None,
        )

    # -- the API ---------------------------------------------------------------------------
    def boot(self, instance_name: str, disk_path: Path | str, **spec: Unpack[DomainSpec]) -> VMInfo:
        """Define and start ``<prefix><instance_name>`` on ``disk_path`` (virtio ``vda``),
        booting ``kernel``/``initrd`` with ``cmdline``; the serial console goes to
        ``console_log`` (truncated first). ``spec``: the keywords of :meth:`render`. An inactive
        domain of this instance is redefined.

        Raises ``InvalidVMInput`` (nothing touched), ``InstanceExists`` if it runs,
        ``ForeignDomain``, or ``VMError`` if libvirt fails (the definition is then removed).
        """
        xml = self.render(instance_name, disk_path, **spec)
        existing = self._owned(instance_name)
        if existing is not None:
            if self._active(existing):
                raise InstanceExists(instance_name)
            try:  # left by an earlier boot: its uuid would clash with the new definition
                existing.undefineFlags(_UNDEFINE_FLAGS)
            except libvirt.libvirtError as err:
                raise VMError(f"removing the old definition of {instance_name}: {err}") from err
        log = _abs_path(spec["console_log"], "console_log")
        if log.is_file():
            log.unlink()  # no stale marker from an earlier boot
        name = self.domain_name(instance_name)
        try:
            dom = self._connection().defineXML(xml)
        except libvirt.libvirtError as err:
            raise VMError(f"defining {name}: {err}") from err
        try:
            dom.create()
        except libvirt.libvirtError as err:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(_UNDEFINE_FLAGS)
            raise VMError(f"starting {name}: {err}") from err
        memory_mib = spec.get("memory_mib", DEFAULT_MEMORY_MIB)
        LOG.info("booted %s (%s, %d MiB) on %s", name, self.domain_type, memory_mib, disk_path)
        return self._info(dom, instance_name)

    def define(self, instance_name: str, xml: str) -> VMInfo:
        """Define (not start) ``xml`` as the instance's domain; the XML must carry our
        metadata for ``instance_name`` (``render`` makes such XML). An inactive domain of
        this instance is replaced; ``InstanceExists`` if it runs, ``VMError`` if libvirt
        fails."""
        instance = validate_instance(instance_name)
        root = ET.fromstring(xml)  # noqa: S314 (rendered by us)
        tag = root.find(f"metadata/{{{METADATA_NS}}}instance")
        if (
            root.findtext("name") != self.domain_name(instance)
            or tag is None
            or ((tag.text or "").strip() != instance)
        ):
            raise InvalidVMInput("xml", instance, "needs our name and metadata for it")
        existing = self._owned(instance)
        if existing is not None and self._active(existing):
            raise InstanceExists(instance)
        try:
            dom = self._connection().defineXML(xml)
        except libvirt.libvirtError as err:
            raise VMError(f"defining {self.domain_name(instance)}: {err}") from err
        LOG.info("defined %s", dom.name())
        return self._info(dom, instance)

    def domain(self, instance_name: str) -> libvirt.virDomain | None:
        """libvirt's object of the instance's domain (ours), or None if it has none;
        ``ForeignDomain`` if a domain of that name is not virtman's."""
        return self._owned(validate_instance(instance_name))

    def connection(self) -> libvirt.virConnect:
        """The open connection (reopened if libvirtd restarted)."""
        return self._connection()

    def info(self, instance_name: str) -> VMInfo:
        """The live state of an instance; ``InstanceNotFound`` if it has no domain."""
        dom = self._owned(validate_instance(instance_name))
        if dom is None:
            raise InstanceNotFound(instance_name)
        return self._info(dom, instance_name)

    def list(self) -> builtins.list[VMInfo]:
        """Every domain virtman defined on ``uri`` (prefix and metadata), by name."""
        try:
            domains = self._connection().listAllDomains(0)
        except libvirt.libvirtError as err:
            raise VMError(f"listing domains: {err}") from err
        found = []
        for dom in domains:
            instance = self._ours(dom)
            if instance is not None:
                with contextlib.suppress(InstanceNotFound):  # undefined meanwhile
                    found.append(self._info(dom, instance))
        return sorted(found, key=lambda i: i.domain)

    def stop(self, instance_name: str, *, timeout_s: float = 30.0) -> bool:
        """Power the instance off: ACPI shutdown, then ``destroy`` after ``timeout_s``. The
        domain stays defined. Returns True if it stopped by itself (or was not running).
        ``InstanceNotFound`` if it has no domain."""
        dom = self._owned(validate_instance(instance_name))
        if dom is None:
            raise InstanceNotFound(instance_name)
        if not self._active(dom):
            return True
        with contextlib.suppress(libvirt.libvirtError):  # it may be stopping already
            dom.shutdown()
        try:
            wait_until(
                lambda: not self._active(dom),
                timeout_s=timeout_s,
                what=f"{dom.name()} to shut down",
                max_interval_s=0.25,
            )
            LOG.info("stopped %s", dom.name())
            return True
        except Timeout:
            LOG.warning("%s did not shut down in %g s: destroying it", dom.name(), timeout_s)
        self._force_off(dom)
        return False

    @staticmethod
    def _force_off(dom: libvirt.virDomain) -> None:
        try:
            dom.destroy()
        except libvirt.libvirtError as err:
            if _code(err) not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                raise VMError(f"destroying {dom.name()}: {err}") from err

    def destroy(self, instance_name: str) -> None:
        """Power off at once and undefine; an instance without a domain is success."""
        dom = self._owned(validate_instance(instance_name))
        if dom is None:
            return
        if self._active(dom):
            self._force_off(dom)
        try:
            dom.undefineFlags(_UNDEFINE_FLAGS)
        except libvirt.libvirtError as err:
            if _code(err) != libvirt.VIR_ERR_NO_DOMAIN:
                raise VMError(f"undefining {dom.name()}: {err}") from err
        LOG.info("destroyed %s", dom.name())
