"""Live migration of a guest between two nodes' libvirtds, moving only what it wrote.

The destination prepares first (``Guests.prepare_incoming``): its own stack for the image
and a new, empty qcow2 snapshot over it, and answers an ``Incoming``: where that disk and
the guest's console are, its kernel and initrd, and how to reach its libvirtd. The source
then migrates (``migrate``): libvirt's managed live migration with a non-shared
*incremental* storage copy (``VIR_MIGRATE_NON_SHARED_INC``: QEMU mirrors only the clusters
allocated in the top layer of the disk, the overlay; the destination reads everything else
from its own stack). The destination's XML is the source's migratable XML with the disk,
console, kernel and initrd paths of the destination.

The source domain is not undefined by libvirt (no ``UNDEFINE_SOURCE``): libvirt keeps a
finished job's statistics only on a domain that still exists, and they hold the bytes
moved (disk and memory apart). The caller undefines it after reading them.

Facts of libvirt 9.0 / QEMU 7.2 that shape this module (measured here):

- the destination's completed job statistics carry the memory bytes but ``disk_*`` = 0;
  the source's (``VIR_DOMAIN_JOB_STATS_COMPLETED``) carry both;
- libvirt refuses a migration between daemons with the same host UUID; two daemons on one
  machine need their own ``host_uuid`` (tests/functional/libvirtpeer.py);
- with an explicit ``tcp://<host>`` URI and listen address, both the memory stream and the
  disk's NBD copy go to that address only.
"""

from __future__ import annotations

import logging
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import Any

import libvirt

from virtman.errors import InvalidInput

LOG = logging.getLogger(__name__)

FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_NON_SHARED_INC
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
)
DISK_TARGET = "vda"  # the one disk of a virtman domain (domain.xml.template)
_PATH_MAX = 4096


@dataclass(frozen=True)
class Settings:
    """A node's side of migrations (virtmanserver's guest_migration_* options)."""

    uri: str  # how other nodes' virtmanservers reach this node's libvirtd
    host: str  # where this node's QEMU listens for an incoming guest
    timeout_s: float = 600.0
    bandwidth_mib_s: int = 0  # 0: unlimited


@dataclass(frozen=True)
class Incoming:
    """What a destination answers ``guest_migrate_prepare``."""

    domain: str  # the domain name it expects (the same on both nodes)
    disk: str  # its new snapshot, over its own stack for the image
    console: str  # the file its console goes to
    kernel: str
    initrd: str
    libvirt_uri: str  # how the source's virtmanserver reaches the destination's libvirtd
    host: str  # where the destination's QEMU listens for the memory and the disk

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def parse(cls, value: Any) -> Incoming:
        """``InvalidInput`` naming the field unless every field is a non-empty string."""
        if not isinstance(value, dict) or set(value) != set(cls.__dataclass_fields__):
            raise InvalidInput(
                "incoming", value, f"must be an object of {sorted(cls.__dataclass_fields__)}"
            )
        for key, item in value.items():
            if not isinstance(item, str) or not item or len(item) > _PATH_MAX or "\0" in item:
                raise InvalidInput(f"incoming.{key}", item, "must be a non-empty string")
        for key in ("disk", "console", "kernel", "initrd"):
            if not value[key].startswith("/"):
                raise InvalidInput(f"incoming.{key}", value[key], "must be an absolute path")
        return cls(**value)


def destination_xml(xml: str, source_disk: str, incoming: Incoming) -> str:
    """The source's migratable XML with the destination's disk, console, kernel and initrd;
    ``InvalidInput`` if it has no disk on ``source_disk``."""
    root = ET.fromstring(xml)  # noqa: S314 (libvirt's own XML)
    found = False
    for source in root.findall("devices/disk/source"):
        if source.get("file") == source_disk:
            source.set("file", incoming.disk)
            found = True
    if not found:
        raise InvalidInput("disk", source_disk, "is not a disk of the domain")
    for kind in ("serial", "console"):
        for source in root.findall(f"devices/{kind}/source"):
            if source.get("path"):
                source.set("path", incoming.console)
    for tag, path in (("kernel", incoming.kernel), ("initrd", incoming.initrd)):
        element = root.find(f"os/{tag}")
        if element is not None:
            element.text = path
    return ET.tostring(root, encoding="unicode")


def migrate(
    dom: libvirt.virDomain,
    incoming: Incoming,
    xml: str,
    *,
    timeout_s: float,
    bandwidth_mib_s: int = 0,
) -> dict[str, Any]:
    """Live-migrate ``dom`` to ``incoming``; its job's figures. Raises ``libvirtError``
    when it fails (the guest then runs on here, as before); after ``timeout_s`` the job is
    aborted. The source domain is left defined and shut off (see the module docstring)."""
    before = _disk_figures(dom)
    params: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml,
        libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{_bracket(incoming.host)}",
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: incoming.host,
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [DISK_TARGET],
    }
    if bandwidth_mib_s:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib_s
    finished = threading.Event()
    watchdog = threading.Thread(
        target=_abort_after, args=(dom, finished, timeout_s), name="migration-watchdog"
    )
    dconn = libvirt.open(incoming.libvirt_uri)
    started = time.monotonic()
    try:
        watchdog.start()
        try:
            dom.migrate3(dconn, params, FLAGS)
        finally:
            finished.set()
            watchdog.join()
    finally:
        dconn.close()
    seconds = time.monotonic() - started
    try:
        job = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as err:  # moved all the same: figures unknown
        LOG.warning("%s: no statistics of the finished migration: %s", dom.name(), err)
        job = {}
    return {
        "disk_bytes": job.get("disk_processed"),
        "memory_bytes": job.get("memory_processed"),
        "total_bytes": job.get("data_processed"),
        "downtime_ms": job.get("downtime"),
        "seconds": round(seconds, 3),
        **before,
    }


def _disk_figures(dom: libvirt.virDomain) -> dict[str, Any]:
    """The disk's virtual size, its overlay's allocation, and what the guest wrote to it
    since its QEMU started (libvirt's block info and block stats)."""
    try:
        capacity, allocation, _ = dom.blockInfo(DISK_TARGET)
        written = dom.blockStats(DISK_TARGET)[3]  # rd_req, rd_bytes, wr_req, wr_bytes, errs
    except libvirt.libvirtError as err:
        LOG.warning("%s: no block figures: %s", dom.name(), err)
        return {}
    return {
        "disk_virtual_bytes": capacity,
        "disk_allocated_bytes": allocation,
        "guest_written_bytes": written,
    }


def _abort_after(dom: libvirt.virDomain, finished: threading.Event, timeout_s: float) -> None:
    if finished.wait(timeout_s):
        return
    LOG.warning("%s: migration not done in %g s: aborted", dom.name(), timeout_s)
    try:
        dom.abortJob()
    except libvirt.libvirtError as err:  # finished meanwhile
        LOG.info("%s: abort: %s", dom.name(), err)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
