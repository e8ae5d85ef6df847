"""One qemu-storage-daemon per compute node, driven at run time over QMP.

``StorageDaemon(name, run_dir)`` owns three files in ``run_dir``: ``<name>.qmp`` (the QMP
socket), ``<name>.pid`` (written by the daemon) and ``<name>.state.json`` (what QMP cannot
tell: the FUSE mountpoints and the NBD server address, so that ``stop`` after a restart still
unmounts exactly our mountpoints). Block nodes and exports are always read from the daemon.

Facts of QEMU 7.2 (qemu-storage-daemon 7.2.22) that shape this module:

- A node name is at most 31 characters (``Node name too long`` otherwise); export and
  object ids follow the same rule here.
- A daemon must never ``blockdev-add`` an NBD client of its own NBD server: the connect runs
  in the main loop that would serve it, so the daemon hangs (and then ignores SIGTERM).
- ``x-blockdev-change`` names quorum children ``children.N`` with N never reused: removing
  ``children.0`` of two and adding one gives ``children.1`` and ``children.2``. The names are
  read from ``x-debug-query-block-graph``. A quorum refuses to drop its last child
  (``The number of children cannot be lower than the vote threshold 1``).
- ``block-export-add type=fuse`` needs an existing regular file as mountpoint
  (``Failed to stat ...``). The file is mounted ``allow_other`` with mode 0400 owned by the
  daemon's user; ``chmod``/``chown`` on the mounted file work and last until unmount.
- ``nbd-server-start`` twice gives ``NBD server already running``; QMP cannot tell the
  address of a running server, hence the state file.
- An NBD server started with ``tls-creds`` of a ``tls-creds-psk`` object refuses every
  option before TLS (``nbdinfo --list`` without TLS gets an error, a wrong key fails the
  handshake); the server reads its ``keys.psk`` at each handshake, a client when its object
  is made. ``object-del`` of credentials still in use is not refused: delete them last.
- ``qom-list /objects`` fails with ``DeviceNotFound: Device '/objects' not found`` until the
  first ``object-add``. A ``secret`` passed by ``object-add`` keeps CHAP passwords off every
  command line.
- A FUSE export's mount gets the kernel's default readahead window, 128 KiB (the
  ``read_ahead_kb`` of its backing device, /sys/class/bdi/<major>:<minor>, whose numbers
  /proc/self/mountinfo gives); writing ``read_ahead_kb`` after the mount widens it (until
  unmount), so that a sequential reader has the next part of the file requested while it
  works on the last (the daemon still serves one FUSE request at a time).
- glibc's malloc raises its mmap threshold dynamically; until it has, every request buffer
  of 128 KiB or more is an mmap + munmap (and page faults). ``MALLOC_MMAP_THRESHOLD_`` in the
  daemon's environment fixes the threshold (and turns the dynamic adjustment off).
- SIGTERM ends the daemon and unmounts its FUSE exports, unless a request is stuck (a dead
  iSCSI path, see shared/reference/env-userspace-stack.md E(4)): then only SIGKILL helps and
  the FUSE mount stays behind (``Transport endpoint is not connected``) until unmounted.

The class is assembled from package-internal modules: ``brick.qsd.core`` (process, QMP link,
state file, queries), ``brick.qsd.graph`` (block nodes), ``brick.qsd.exports`` (TLS, NBD
server, NBD and FUSE exports), ``brick.qsd.validate`` (pure checks) and ``brick.qsd.mounts``
(/proc mount facts).
"""

from __future__ import annotations

from brick.qsd.core import BINARY, NETNS_DIR, QMP_CHARDEV, Export
from brick.qsd.exports import ExportOps
from brick.qsd.graph import GraphOps
from brick.qsd.mounts import mount_device, mounted_paths
from brick.qsd.qmp import QMPDisconnected
from brick.qsd.validate import (
    MAX_MMAP_THRESHOLD_KIB,
    MAX_READAHEAD_KIB,
    validate_abs_path,
    validate_daemon_name,
    validate_host,
    validate_iqn,
    validate_netns,
    validate_node_name,
    validate_port,
    validate_portal,
)


class StorageDaemon(ExportOps, GraphOps):
    """One ``qemu-storage-daemon`` with a QMP monitor on ``run_dir/<name>.qmp``.

    With ``netns``, the daemon is started through ``nsenter --net=/var/run/netns/<netns>``: it
    joins only that network namespace and keeps the root mount namespace, so its FUSE exports
    are visible to tgtd and libvirt (``ip netns exec`` would hide them in a private one).

    Every helper validates its arguments before anything runs (``InvalidArgument``), is
    idempotent where that makes sense (the same request again is a no-op; an object with our
    name but other parameters raises ``Conflict``), and raises ``QMPError`` when QEMU refuses.
    """


__all__ = [
    "BINARY",
    "MAX_MMAP_THRESHOLD_KIB",
    "MAX_READAHEAD_KIB",
    "NETNS_DIR",
    "QMP_CHARDEV",
    "Export",
    "QMPDisconnected",
    "StorageDaemon",
    "mount_device",
    "mounted_paths",
    "validate_abs_path",
    "validate_daemon_name",
    "validate_host",
    "validate_iqn",
    "validate_netns",
    "validate_node_name",
    "validate_port",
    "validate_portal",
]
