"""qemu-storage-daemon plumbing: a synchronous QMP client and one daemon per compute node.

``brick.qsd.qmp.QMPClient`` speaks QMP over a unix socket; ``brick.qsd.daemon.StorageDaemon``
starts, adopts and stops one daemon and builds its block graph (iSCSI/NBD paths, a quorum
over them, a qcow2 cache with copy-on-read) and its FUSE and NBD exports.
"""

from brick.qsd.daemon import Export, StorageDaemon, validate_node_name
from brick.qsd.qmp import QMPClient, QMPDisconnected, QMPError

__all__ = [
    "Export",
    "QMPClient",
    "QMPDisconnected",
    "QMPError",
    "StorageDaemon",
    "validate_node_name",
]
