"""Device-mapper over ``dmsetup``: tables as dataclasses, devices as one ``DeviceMapper``.

The PyPI ``pydm`` the original used is gone (the name now belongs to an unrelated project), so
this is our own small package, one module per job:

- :mod:`brick.dm.table` (pure): one frozen dataclass per target kind renders one table line:
  ``Linear``, ``Error``, ``Zero``, ``Multipath``, ``SnapshotOrigin``, ``Snapshot``. ``Table``
  joins them (contiguous from sector 0).
- :mod:`brick.dm.parse` (pure): ``parse_table`` / ``parse_status`` / ``parse_ls`` /
  ``parse_info`` read what ``dmsetup`` prints back.
- :mod:`brick.dm.dmsetup`: ``DeviceMapper`` runs ``dmsetup`` through one injectable
  ``execute`` (the only seam through which root commands run; a privsep-backed executor can
  replace it). Every name, UUID and device path is validated before any command runs.
- :mod:`brick.dm.multipath`: ``MultipathMonitor`` (below).

Facts from a real run (Debian 6.1 cloud kernel, dmsetup 1.02.185, in a QEMU guest) that shape
this module:

- ``dmsetup table`` prints devices as ``major:minor`` and ends some lines with a space.
- Request-based multipath ignores a path repeat count above 1: the original's ``... <dev> 128``
  is shown back as ``<dev> 1`` (the kernel logs "repeat_count > 1 is deprecated").
- A failed ``dmsetup create`` removes the half-made device itself; a failed ``dmsetup reload``
  leaves the live table untouched (and no inactive one), so ``resume`` brings the old one back.
- ``dmsetup remove`` of a missing device: ``No such device or address``; of an open one:
  ``Device or resource busy``; ``--deferred`` returns 0 and removes it at last close.

**Path failures (multipath).** The kernel moves I/O of a failed path to the other paths of the
group; a dead path therefore does not fail I/O while one path works. With *no* path left, the
original's table (no features) fails I/O at once. Here ``Multipath(queue_if_no_path=True)``
(the default) queues it instead, and ``MultipathMonitor`` bounds that queueing the way
multipathd's ``no_path_retry`` does: after ``no_path_retry_s`` seconds with no active path it
sends ``fail_if_no_path`` (queued I/O then fails), and it turns queueing back on as soon as a
path is active again. Without multipathd nobody reinstates a path the kernel failed, so the
monitor also reinstates failed paths whose SCSI device is ``running`` again. The caller (the
node's periodic loop) calls ``MultipathMonitor.check()``; brick starts no thread. How fast a dead
iSCSI path fails at all is the initiator's ``replacement_timeout`` (see ``brick.iscsi``).
"""

from __future__ import annotations

from brick.dm.dmsetup import DeviceMapper, Executor, device_number, is_block_device
from brick.dm.multipath import MultipathMonitor, scsi_path_ready
from brick.dm.table import Linear, Multipath, Snapshot, SnapshotOrigin, Table

__all__ = [
    "DeviceMapper",
    "Executor",
    "Linear",
    "Multipath",
    "MultipathMonitor",
    "Snapshot",
    "SnapshotOrigin",
    "Table",
    "device_number",
    "is_block_device",
    "scsi_path_ready",
]
