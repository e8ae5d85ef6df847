"""A guest's VMThunder snapshot exported by this node over iSCSI, for a hypervisor that is
not on this node (an ESXi host of the vCenter backend maps the LUN as the VM's disk).

One tgtd target per guest, ``<iqn_prefix>vmdisk-<instance>`` (lower case), LUN 1,
read-write, the node's CHAP account; it never starts with ``volume-``, so the image service
never takes it for an image export. The snapshot is exported as the driver made it: with the
dm driver a block device (raw blocks, what an ESXi host reads); with the qemu driver a qcow2
overlay file, whose LUN carries the qcow2 bytes (fine for the simulator, which never reads it;
a real ESXi host needs the dm driver).
"""

from __future__ import annotations

import logging

from brick.tgt import Chap, TgtAdm
from brick.values import IQN
from virtman.guest.vcenter_rdm import IscsiExport

LOG = logging.getLogger(__name__)

LUN = 1


class DiskExports:
    """The guests' disk targets on this node's tgtd, reached at ``portal_host:portal_port``."""

    def __init__(
        self, tgt: TgtAdm, chap: Chap | None, iqn_prefix: str, portal_host: str, portal_port: int
    ) -> None:
        self.tgt, self.chap = tgt, chap
        self.iqn_prefix = iqn_prefix
        self.portal = (portal_host, portal_port)

    def iqn(self, instance: str) -> str:
        return IQN.parse(f"{self.iqn_prefix}vmdisk-{instance.lower()}", ("iqn",))

    def export(self, instance: str, disk: str) -> IscsiExport:
        """Export ``disk`` (idempotent: the same export again is no change)."""
        export = IscsiExport(*self.portal, iqn=self.iqn(instance), lun=LUN)
        self.tgt.create_target(export.iqn, disk, lun=LUN, readonly=False, chap=self.chap)
        LOG.info("exported %s's disk %s as %s lun %d", instance, disk, export.iqn, LUN)
        return export

    def remove(self, instance: str) -> None:
        """Remove the guest's target (initiators dropped); none is success."""
        self.tgt.delete_target(self.iqn(instance))

    def exported(self, instance: str) -> bool:
        return self.tgt.find(self.iqn(instance)) is not None
