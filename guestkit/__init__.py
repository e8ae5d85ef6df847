"""guestkit: QEMU test guests running Debian's own kernel, for the kernel-side (dm) stack.

``build_guest()`` makes (or finds cached) a Debian bookworm guest with open-iscsi, tgt,
dmsetup, rtslib-fb, udev, qemu-storage-daemon and the project's pinned requirements in a venv;
``run_guests(guest, nodes, payload_dir)`` boots N of them under TCG on private bridges inside
a network namespace the run creates, each running the payload's ``run.sh`` with the project's
current code, and brings their results back. See docs/guestkit.rst.
"""

from guestkit.build import Guest, build_guest, default_cache_dir
from guestkit.run import Node, NodeResult, RunResult, cleanup_stale, run_guests

__all__ = [
    "Guest",
    "Node",
    "NodeResult",
    "RunResult",
    "build_guest",
    "cleanup_stale",
    "default_cache_dir",
    "run_guests",
]
