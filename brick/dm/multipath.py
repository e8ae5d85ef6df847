"""Bounded queueing and path reinstatement for multipath devices (see :mod:`brick.dm`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from brick.dm.dmsetup import DeviceMapper
from brick.dm.parse import MultipathStatus
from brick.dm.table import validate_device, validate_name

LOG = logging.getLogger(__name__)


def scsi_path_ready(devno: str, sysfs: str = "/sys") -> bool:
    """Whether the SCSI disk ``major:minor`` is ``running`` again (its session is back)."""
    try:
        with open(f"{sysfs}/dev/block/{validate_device(devno)}/device/state") as f:
            return f.read().strip() == "running"
    except OSError:
        return False


@dataclass
class MultipathMonitor:
    """Bounded queueing and path reinstatement for one multipath device (see module doc).

    Call ``check()`` periodically (every few seconds). With no active path for
    ``no_path_retry_s`` it turns ``queue_if_no_path`` off so queued I/O fails instead of
    hanging forever; when a path is active again it turns queueing back on. A failed path whose
    device ``path_ready`` says is usable again is reinstated.
    """

    dm: DeviceMapper
    name: str
    no_path_retry_s: float = 30.0
    path_ready: Callable[[str], bool] = scsi_path_ready
    clock: Callable[[], float] = time.monotonic
    _no_path_since: float | None = field(default=None, init=False)
    _queue_disabled: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        validate_name(self.name)

    def check(self) -> MultipathStatus:
        """Look once, act, and return the status seen (before any action)."""
        status = self.dm.multipath_status(self.name)
        for path in status.failed_paths:
            if self.path_ready(path.device):
                LOG.info("%s: path %s is usable again: reinstating it", self.name, path.device)
                self.dm.reinstate_path(self.name, path.device)
        active = bool(status.active_paths) or any(self.path_ready(p.device) for p in status.paths)
        now = self.clock()
        if active:
            self._no_path_since = None
            if self._queue_disabled:
                LOG.info("%s: a path is back: queueing with no path again", self.name)
                self.dm.set_queue_if_no_path(self.name, True)
                self._queue_disabled = False
        else:
            if self._no_path_since is None:
                self._no_path_since = now
                LOG.warning("%s: no active path: I/O is queued", self.name)
            elif not self._queue_disabled and now - self._no_path_since >= self.no_path_retry_s:
                LOG.error(
                    "%s: no path for %.0f s: failing queued I/O",
                    self.name,
                    now - self._no_path_since,
                )
                self.dm.set_queue_if_no_path(self.name, False)
                self._queue_disabled = True
        return status
