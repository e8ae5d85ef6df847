"""The one privileged context of VMThunder (oslo.privsep) and its allow-list.

Every root-only operation goes through an entry point in ``brick/privileged/<topic>.py``
(``@vmt_root.entrypoint``); nothing else in product code runs a root-only command, writes a
kernel knob or starts a subprocess (``tests/unit/brick/test_privileged.py`` scans for it).

Two modes, chosen once per process:

- **off** (the default, ``privsep = false`` in virtman.conf): entry points run in the calling
  process, which must then hold the privileges itself (virtman run as root, as before).
- **on** (``start()``): a privsep daemon holds exactly ``CAPABILITIES``; entry points run
  there and only msgpack primitives cross the socket. Launch: fork when the caller is root
  (``Method.FORK``), otherwise oslo.privsep's ``privsep-helper`` through the command set in
  ``[brick_privsep] helper_command`` (``Method.ROOTWRAP``). See docs/privsep.rst.
"""

from __future__ import annotations

import logging
import os

from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context

LOG = logging.getLogger(__name__)

CFG_SECTION = "brick_privsep"

# Each capability the daemon keeps, and why (oslo.privsep has no "all capabilities").
CAPABILITIES: dict[int, str] = {
    caps.CAP_SYS_ADMIN: "device-mapper ioctls, loop devices, FUSE mounts, setns into a netns",
    caps.CAP_NET_ADMIN: "network namespaces, veth/bridge/tap links, tc qdiscs",
    caps.CAP_DAC_OVERRIDE: "open root-owned block device nodes and /sys knobs",
    caps.CAP_SYS_MODULE: "modprobe dm-multipath / dm-cache / loop when not loaded",
    caps.CAP_SYS_RAWIO: "SCSI disk delete and block-device flush ioctls",
    caps.CAP_NET_BIND_SERVICE: "tgtd listens on the iSCSI port 3260",
}

vmt_root = priv_context.PrivContext(
    "brick.privileged",
    cfg_section=CFG_SECTION,
    pypath=__name__ + ".vmt_root",
    capabilities=list(CAPABILITIES),
)
# Off until start(): entry points run in-process instead of launching a daemon on first use.
vmt_root.set_client_mode(False)


def enabled() -> bool:
    """True once ``start()`` put a privsep daemon between us and the entry points."""
    return vmt_root.client_mode


def start() -> None:
    """Start the privsep daemon (fork if we are root, else ``privsep-helper``) and route every
    entry point through it. Idempotent."""
    if enabled():
        return
    method = priv_context.Method.FORK if os.geteuid() == 0 else priv_context.Method.ROOTWRAP
    vmt_root.start(method)
    vmt_root.set_client_mode(True)
    LOG.info("privsep: daemon started (%s), capabilities %s", method.name, describe())


def stop() -> None:
    """Stop the privsep daemon; entry points run in-process again."""
    vmt_root.stop()
    vmt_root.set_client_mode(False)


def describe() -> list[str]:
    """The kept capabilities by name, for logs and docs."""
    return [caps.CAPS_BYVALUE.get(c, str(c)) for c in CAPABILITIES]
