"""The journal side of a node's guests, shared by the libvirt and the vCenter backends.

A guest is named by its z/VM userid (1-8 of ``[A-Za-z0-9]``, upper-cased on input); its
instance (and snapshot) name is ``<name_prefix><USERID>``; its record lives in the node's
journal, section ``guests``. ``GuestRecords`` holds the names, the per-userid locks and the
record verbs (``create``, ``list``); each backend adds the hypervisor's.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from virtman import validation
from virtman.errors import GuestExists, GuestNotFound, GuestStateError, InvalidInput

LOG = logging.getLogger(__name__)

KIND = "guests"  # the journal section
Connections = Callable[[str], Any]  # image name -> the connection dict(s) of Virtman.create
USERID = re.compile(r"[A-Za-z0-9]{1,8}")
MAX_VCPUS = 64
MEMORY_MB = (32, 1 << 20)
MAX_DISK_GB = 1 << 16


def validate_userid(value: object) -> str:
    """The userid upper-cased; ``InvalidInput`` unless 1-8 of ``[A-Za-z0-9]``."""
    if not isinstance(value, str) or not USERID.fullmatch(value):
        raise InvalidInput("userid", value, "must be 1-8 of A-Z a-z 0-9")
    return value.upper()


def integer(field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(field, value, f"must be an integer {low}-{high}")
    return value


def check_softstop(timeout_s: object, poll_interval_s: object) -> None:
    """``InvalidInput`` unless both of softstop's options are numbers >= 0."""
    for field, value in (("timeout", timeout_s), ("poll_interval", poll_interval_s)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InvalidInput(field, value, "must be a number >= 0")


def result_of(answer: str) -> tuple[int, str]:
    """Virtman's ``"<code>:<info>"``."""
    code, _, info = answer.partition(":")
    return int(code), info


def boot_time() -> float:
    """When this host booted (epoch seconds): the ``ipl_time`` of host info."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return time.time() - time.monotonic()


class GuestRecords:
    """The guests recorded in ``journal``, one lock per userid."""

    def __init__(self, journal: Any, name_prefix: str) -> None:
        self.journal = journal
        self.name_prefix = name_prefix
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def instance_name(self, userid: str) -> str:
        return self.name_prefix + validate_userid(userid)

    @contextlib.contextmanager
    def _locked(self, userid: str) -> Iterator[str]:
        uid = validate_userid(userid)
        with self._locks_lock:
            lock = self._locks.setdefault(uid, threading.Lock())
        with lock:
            yield uid

    def _record(self, uid: str) -> dict[str, Any]:
        record = self.journal.records(KIND).get(uid)
        if record is None:
            raise GuestNotFound(uid)
        return record

    def record(self, userid: str) -> dict[str, Any]:
        """A copy of the guest's record; ``GuestNotFound``."""
        return dict(self._record(validate_userid(userid)))

    def _save(self, uid: str, record: dict[str, Any], **changes: Any) -> dict[str, Any]:
        record = {**record, **changes}
        self.journal.put(KIND, uid, record)
        return record

    def list(self) -> builtins.list[str]:
        return sorted(self.journal.records(KIND))

    # -- idempotent by userid: the cluster controller's verbs over the bus (docs/bus.rst) ----
    # A bus call whose answer was lost is sent again (over the bus or XML-RPC): the second of
    # two identical calls is a no-op that succeeds, one that contradicts the record still
    # fails. The per-userid lock orders them: a deploy sent again while the first runs
    # waits for it, then sees its disk.
    def create_once(self, userid: str, vcpus: int, memory_mb: int, disk_gb: int = 0) -> bool:
        """``create``; True if it created the guest, False if it was recorded already with
        this flavor. ``GuestStateError`` if it was recorded with another one."""
        try:
            self.create(userid, vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb)
        except GuestExists:
            record = self.record(userid)
            had = (record.get("vcpus"), record.get("memory_mb"), record.get("disk_gb", 0))
            if had != (vcpus, memory_mb, disk_gb):
                raise GuestStateError(
                    validate_userid(userid),
                    f"exists with vcpus, memory_mb, disk_gb {had}, not "
                    f"{(vcpus, memory_mb, disk_gb)}",
                ) from None
            return False
        return True

    def deploy_once(self, userid: str, image: str) -> bool:
        """The backend's ``deploy``; True if it deployed now, False if the guest has a disk
        of ``image`` already (the deploy's ``GuestStateError`` otherwise: of another image,
        or not deployable)."""
        name = validation.image_name(image)
        try:
            self.deploy(userid, name)  # type: ignore[attr-defined]  # each backend's own
        except GuestStateError:
            record = self.record(userid)
            if record.get("disk") and record.get("image") == name:
                return False
            raise
        return True

    def create(self, userid: str, *, vcpus: int, memory_mb: int, disk_gb: int = 0) -> None:
        """Record a guest (nothing on the hypervisor yet). ``GuestExists`` if recorded;
        ``InvalidInput``."""
        uid = validate_userid(userid)
        record = {
            "userid": uid,
            "instance": self.instance_name(uid),
            "vcpus": integer("vcpus", vcpus, 1, MAX_VCPUS),
            "memory_mb": integer("memory_mb", memory_mb, *MEMORY_MB),
            "disk_gb": integer("disk_gb", disk_gb, 0, MAX_DISK_GB),
            "image": None,
            "disk": None,
            "state": "off",
        }
        with self._locked(uid):
            if uid in self.journal.records(KIND):
                raise GuestExists(uid)
            self.journal.put(KIND, uid, record)
        LOG.info("guest %s created (%d vcpu, %d MB)", uid, vcpus, memory_mb)
