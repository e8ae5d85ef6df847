"""Privileged entry points that run commands: only the allow-listed binaries, argv only.

``ROOT_COMMANDS`` is the whole list of binaries that need root; ``brick.executor.execute``
sends these (and only these) here when privsep is on, and runs every other command in the
caller, unprivileged. Inside the entry point each argv is checked again (a caller cannot ask
the daemon for anything else), the binary is looked up on a fixed ``PATH`` and the caller's
environment is reduced to ``PASSED_ENV``. Refusals raise :class:`brick.exception.NotPermitted`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence

from oslo_privsep import capabilities as caps

from brick.exception import NotPermitted
from brick.privileged import vmt_root

LOG = logging.getLogger(__name__)
# How many commands execute_root ran in this process (the daemon's, when privsep is on).
_executed = 0
_executed_lock = threading.Lock()

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Environment variables a caller may pass to a privileged command (PATH is always SAFE_PATH).
PASSED_ENV = frozenset({"LANG", "LC_ALL", "TZ", "MALLOC_MMAP_THRESHOLD_"})

# binary -> why it needs root. Keep docs/privsep.rst's table in step.
ROOT_COMMANDS: dict[str, str] = {
    "dmsetup": "device-mapper tables of the multipath, cache and snapshot layers",
    "blockdev": "size and read-only flag of a block device (opens the device node)",
    "losetup": "loop devices over cache and snapshot files",
    "modprobe": "loads dm-multipath, dm-cache, dm-snapshot or loop",
    "iscsiadm": "open-iscsi initiator sessions (logins, logouts, node records)",
    "xargs": "only `xargs -0 -r iscsiadm ...`: a CHAP secret goes on stdin, never in argv",
    "udevadm": "only `udevadm settle`, after a login, until device nodes exist",
    "tee": "only `tee -a /sys/block/sdX/device/delete`: drops a SCSI disk after logout",
    "tgtadm": "targets, LUNs and CHAP accounts of tgtd (its management socket is root's)",
    "ip": "network namespaces, veth/bridge/tap links and addresses",
    "tc": "token-bucket rate limits on lab links; the uplink's reader classes (brick.uplink)",
    "nsenter": "only `nsenter --net=/var/run/netns/<ns>` followed by an allow-listed command",
    "fusermount3": "only `fusermount3 -u -z <mountpoint>`: lazy unmount of a FUSE export",
    "qemu-storage-daemon": "FUSE exports and block-device nodes (started with --daemonize)",
}

# binary -> why it runs as a long-lived root daemon; ``brick.daemon.Supervisor.spawn`` starts
# these (and only these) through ``spawn_root`` when privsep is on.
ROOT_DAEMONS: dict[str, str] = {
    "tgtd": "iSCSI target daemon: binds the portals (port 3260) and reads the backing files",
}

_NETNS_ARG = re.compile(r"--net=/(?:var/)?run/netns/[A-Za-z0-9._-]{1,64}")
_SCSI_DELETE = re.compile(r"/sys/block/sd[a-z]{1,4}/device/delete")
# "portal=<host>:<port>" once per portal, comma-joined (brick.tgt.daemon.TgtDaemon.argv)
_PORTAL = r"portal=[0-9A-Za-z.:\[\]]{1,64}"
_TGTD_PORTALS = re.compile(rf"{_PORTAL}(?:,{_PORTAL}){{0,15}}")


def _refuse(value: object, rule: str) -> NotPermitted:
    return NotPermitted("execute_root", str(value), rule)


def _check_xargs(argv: Sequence[str]) -> None:
    if list(argv[1:4]) != ["-0", "-r", "iscsiadm"]:
        raise _refuse(" ".join(argv), "xargs may only run `xargs -0 -r iscsiadm ...`")


def _check_udevadm(argv: Sequence[str]) -> None:
    if len(argv) < 2 or argv[1] != "settle":
        raise _refuse(" ".join(argv), "udevadm may only `settle`")


def _check_tee(argv: Sequence[str]) -> None:
    if len(argv) != 3 or argv[1] != "-a" or not _SCSI_DELETE.fullmatch(argv[2]):
        raise _refuse(" ".join(argv), "tee may only append to /sys/block/sdX/device/delete")


def _check_fusermount(argv: Sequence[str]) -> None:
    if len(argv) != 4 or argv[1:3] != ["-u", "-z"] or not os.path.isabs(argv[3]):
        raise _refuse(" ".join(argv), "fusermount3 may only `-u -z <absolute mountpoint>`")


def _check_nsenter(argv: Sequence[str]) -> None:
    if len(argv) < 3 or not _NETNS_ARG.fullmatch(argv[1]):
        raise _refuse(" ".join(argv), "nsenter needs --net=/var/run/netns/<ns> and a command")
    check_argv(argv[2:])


_CHECKS: dict[str, Callable[[Sequence[str]], None]] = {
    "xargs": _check_xargs,
    "udevadm": _check_udevadm,
    "tee": _check_tee,
    "fusermount3": _check_fusermount,
    "nsenter": _check_nsenter,
}


def _check_tgtd(argv: Sequence[str]) -> None:
    if (
        len(argv) != 6
        or argv[1:3] != ["-f", "-C"]
        or not argv[3].isascii()
        or not argv[3].isdigit()
        or argv[4] != "--iscsi"
        or not _TGTD_PORTALS.fullmatch(argv[5])
    ):
        raise _refuse(" ".join(argv), "tgtd may only run `tgtd -f -C <n> --iscsi portal=...`")


_DAEMON_CHECKS: dict[str, Callable[[Sequence[str]], None]] = {"tgtd": _check_tgtd}


def is_root_daemon(argv: Sequence[str]) -> bool:
    """True if ``argv`` starts a daemon of ``ROOT_DAEMONS`` (perhaps behind ``nsenter``)."""
    if len(argv) > 2 and argv[0] == "nsenter":
        argv = argv[2:]
    return bool(argv) and argv[0] in ROOT_DAEMONS


def check_daemon_argv(argv: Sequence[str]) -> None:
    """:class:`NotPermitted` unless ``argv`` starts an allow-listed root daemon, optionally as
    ``nsenter --net=/var/run/netns/<ns> <daemon argv>``."""
    if not argv or any(not isinstance(a, str) or "\0" in a for a in argv):
        raise _refuse(argv, "argv must be a non-empty list of str without NUL")
    command = list(argv)
    if command[0] == "nsenter":
        if len(command) < 3 or not _NETNS_ARG.fullmatch(command[1]):
            raise _refuse(" ".join(argv), "nsenter needs --net=/var/run/netns/<ns> and a daemon")
        command = command[2:]
    if command[0] not in ROOT_DAEMONS:
        raise _refuse(command[0], "not an allow-listed root daemon (brick.privileged.process)")
    _DAEMON_CHECKS[command[0]](command)


def needs_root(argv: Sequence[str]) -> bool:
    """True if ``argv`` runs a binary of ``ROOT_COMMANDS`` (by bare name)."""
    return bool(argv) and argv[0] in ROOT_COMMANDS


def check_argv(argv: Sequence[str]) -> None:
    """:class:`NotPermitted` unless ``argv`` is an allow-listed command with allowed arguments.
    A list or a tuple (the privsep channel delivers lists as tuples): checked as a list."""
    if not argv or any(not isinstance(a, str) or "\0" in a for a in argv):
        raise _refuse(argv, "argv must be a non-empty list of str without NUL")
    argv = list(argv)
    if argv[0] not in ROOT_COMMANDS:
        raise _refuse(argv[0], "not an allow-listed root command (brick.privileged.process)")
    check = _CHECKS.get(argv[0])
    if check is not None:
        check(argv)


def _environment(env: Mapping[str, str] | None) -> dict[str, str]:
    passed = {k: v for k, v in (env or os.environ).items() if k in PASSED_ENV}
    return {**passed, "PATH": SAFE_PATH}


@vmt_root.entrypoint
def execute_root(
    argv: list[str], stdin: str | None, timeout_s: float, env: dict[str, str] | None
) -> tuple[str, str, int, bool]:
    """Run the allow-listed ``argv`` with the daemon's privileges. Returns ``(stdout, stderr,
    exit_code, timed_out)``; the caller turns a failure into ``CommandFailed``/``Timeout``."""
    check_argv(argv)
    if not 0 < timeout_s <= 3600:
        raise _refuse(timeout_s, "timeout_s must be in (0, 3600]")
    binary = shutil.which(argv[0], path=SAFE_PATH)
    if binary is None:
        return "", f"{argv[0]}: not found on {SAFE_PATH}", 127, False
    global _executed
    with _executed_lock:
        _executed += 1
    try:
        proc = subprocess.run(
            [binary, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=_environment(env),
            check=False,
        )
    except subprocess.TimeoutExpired:
        LOG.debug("privileged %s (pid %d): timed out", argv[0], os.getpid())
        return "", "", -1, True
    # the binary and the pid only: arguments may carry a CHAP user or a target's secret
    LOG.debug("privileged %s (pid %d): rc %d", argv[0], os.getpid(), proc.returncode)
    return proc.stdout, proc.stderr, proc.returncode, False


# the daemons spawn_root started, by PID (a thread per child reaps it)
_children: dict[int, subprocess.Popen[bytes]] = {}
_LOG_NAME = re.compile(r"/[^\0]{1,4000}\.log")


@vmt_root.entrypoint
def spawn_root(argv: list[str], log_path: str, env: dict[str, str] | None) -> int:
    """Start the allow-listed daemon ``argv`` in its own session, its output appended to
    ``log_path`` (an absolute ``*.log`` path, not a symlink); return its PID. It outlives
    this process (reparented to init); ``spawned_exit`` tells its exit code meanwhile."""
    check_daemon_argv(argv)
    if not _LOG_NAME.fullmatch(log_path) or "/../" in log_path:
        raise _refuse(log_path, "log_path must be an absolute path ending in .log")
    binary = shutil.which(argv[0], path=SAFE_PATH)
    if binary is None:
        raise _refuse(argv[0], f"not found on {SAFE_PATH}")
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    try:
        child = subprocess.Popen(
            [binary, *argv[1:]],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            env=_environment(env),
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    _children[child.pid] = child
    threading.Thread(target=child.wait, name=f"reap-{child.pid}", daemon=True).start()
    LOG.debug("privileged %s (pid %d): spawned pid %d", argv[0], os.getpid(), child.pid)
    return child.pid


@vmt_root.entrypoint
def spawned_exit(pid: int) -> int | None:
    """The exit code of a daemon ``spawn_root`` started; None while it runs (or if unknown)."""
    child = _children.get(pid)
    return None if child is None else child.poll()


@vmt_root.entrypoint
def whoami() -> dict[str, object]:
    """Who runs the entry points: PID, uid, effective capabilities (logged at start) and how
    many commands ``execute_root`` has run there."""
    effective = caps.get_caps()[0]
    return {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "capabilities": sorted(caps.CAPS_BYVALUE.get(c, str(c)) for c in effective),
        "executed": _executed,
    }
