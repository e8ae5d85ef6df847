"""The userspace iSCSI target tgt: one ``tgtd`` process and its ``tgtadm`` control socket.

Used by the image server (export image files) and by every compute node (relay its cached
image read-only). Three modules: :mod:`brick.tgt.parse` (validation, the objects tgtd
reports and the ``--op show`` parsers, pure), :mod:`brick.tgt.adm` and :mod:`brick.tgt.daemon`
with the two classes:

- ``TgtDaemon``: start, adopt and stop one ``tgtd`` (its own control port ``-C N``, its own
  portals, optionally inside a network namespace).
- ``TgtAdm``: targets, LUNs, ACLs and CHAP accounts of one running ``tgtd``. Nothing is cached:
  every query reads ``tgtadm --op show`` again, so a restarted process sees what is there.

Facts about tgt 1.0.85 that shape this module (see shared/reference/env-userspace-stack.md D):

- tgtd ignores SIGTERM and SIGINT; it stops only through ``tgtadm --op delete --mode system``,
  which is refused (``tgtadm: invalid request``) while any target exists. SIGKILL is the
  fallback, by PID only.
- The control socket ``/var/run/tgtd/socket.N`` (+ ``.lock``) is a file, shared by every
  network namespace, and stays behind after tgtd exits.
- A portal that cannot be bound (address in use) does not stop tgtd: it logs
  ``failed to create/bind to portal`` and runs without it. ``portal=::1:3260`` (IPv6 without
  brackets) is silently ignored and tgtd listens on 0.0.0.0:3260 instead. ``start`` therefore
  checks the daemon's own listening sockets.
- ``--params readonly=1`` is rejected by ``--op new``; it is applied with ``--op update``.
- ``Size:`` in ``--op show`` is in decimal megabytes, rounded (4 MiB shows as ``4 MB``).
"""

from __future__ import annotations

from brick.tgt.adm import TgtAdm
from brick.tgt.daemon import TgtDaemon
from brick.tgt.parse import Chap, Target, validate_iqn, validate_portal

__all__ = [
    "Chap",
    "Target",
    "TgtAdm",
    "TgtDaemon",
    "validate_iqn",
    "validate_portal",
]
