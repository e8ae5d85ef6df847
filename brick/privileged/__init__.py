"""The one privileged context of VMThunder (oslo.privsep) and its allow-list.

Every root-only operation goes through an entry point in ``brick/privileged/<topic>.py``
(``@vmt_root.entrypoint``); nothing else in product code runs a root-only command, writes a
kernel knob or starts a subprocess (``tests/unit/brick/test_privileged.py`` scans for it).

Two modes, chosen once per process:

- **on** (``start()``; virtmanserver's default, ``privsep = true``): a privsep daemon holds
  exactly ``CAPABILITIES``; entry points run there and only msgpack primitives cross the
  socket. Launch: fork when the caller is root (``Method.FORK``), otherwise oslo.privsep's
  ``privsep-helper`` through the command set in ``[brick_privsep] helper_command``
  (``Method.ROOTWRAP``, with time limits oslo.privsep lacks). A daemon that does not come up
  raises :class:`PrivsepUnavailable` within ``START_TIMEOUT_S``, never hangs.
- **off** (no ``start()``; ``privsep = false``, and library use such as tests and tools):
  entry points run in the calling process, which must then hold the privileges itself.

See docs/privsep.rst.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile

from oslo_config import cfg
from oslo_privsep import capabilities as caps
from oslo_privsep import daemon, priv_context

from brick import proc
from brick.exception import BrickError, Timeout
from brick.wait import wait_until

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
# oslo.privsep's default pool is one thread per CPU: on a 2-core node two slow iscsiadm logins
# would hold every other root command back. Commands are short; 16 run side by side.
cfg.CONF.set_default("thread_pool_size", 16, group=CFG_SECTION)
cfg.CONF.set_default("logger_name", "brick.privileged.daemon", group=CFG_SECTION)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

_daemon_pid: int | None = None  # the running daemon's PID, for stop() to wait on


class PrivsepUnavailable(BrickError):
    """The privsep daemon could not be started (or did not answer in time)."""

    def __init__(self, method: str, reason: str) -> None:
        self.method, self.reason = method, reason
        super().__init__(f"privsep daemon ({method}) did not start: {reason}")


def enabled() -> bool:
    """True once ``start()`` put a privsep daemon between us and the entry points."""
    return vmt_root.client_mode


def _helper_argv() -> list[str]:
    """The command ``Method.ROOTWRAP`` runs (the socket path is a placeholder)."""
    return vmt_root.helper_command("<socket>")


class _HelperChannel(daemon._ClientChannel):
    """oslo.privsep's helper launch (``Method.ROOTWRAP``) with time limits.

    Same protocol: listen on a socket in a private (0700) directory, run the helper command
    with its path, the helper connects and forks the daemon, then exits 0. oslo.privsep
    waits for the helper and for the connection without a limit (a ``sudo`` asking for a
    password, a daemon that died before connecting: a hang); here each has ``timeout_s``.
    """

    def __init__(self, context: priv_context.PrivContext, timeout_s: float) -> None:
        with tempfile.TemporaryDirectory(prefix="vmt-privsep-") as tmp:
            path = os.path.join(tmp, "privsep.sock")
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(path)
                listener.listen(1)
                listener.settimeout(timeout_s)
                argv = context.helper_command(path)
                LOG.info("privsep: running the helper %s", shlex.join(argv))
                try:
                    code = subprocess.run(
                        argv, stdin=subprocess.DEVNULL, timeout=timeout_s, check=False
                    ).returncode
                except subprocess.TimeoutExpired:
                    raise PrivsepUnavailable(
                        "ROOTWRAP", f"{argv[0]} still runs after {timeout_s:g} s (a password?)"
                    ) from None
                except OSError as exc:
                    raise PrivsepUnavailable("ROOTWRAP", f"cannot run {argv[0]}: {exc}") from None
                if code != 0:
                    raise PrivsepUnavailable("ROOTWRAP", f"{argv[0]} exited with {code}")
                try:
                    sock, _addr = listener.accept()
                except TimeoutError:
                    raise PrivsepUnavailable(
                        "ROOTWRAP", f"the daemon did not connect within {timeout_s:g} s"
                    ) from None
        sock.settimeout(None)
        super().__init__(sock, context)


def start(method: priv_context.Method | None = None, *, timeout_s: float = START_TIMEOUT_S) -> None:
    """Start the privsep daemon (``method``; default: fork if we are root, else the helper
    command) and route every entry point through it. Idempotent.

    :class:`PrivsepUnavailable` if the helper command is not on PATH, exits non-zero or runs
    past ``timeout_s``, the daemon does not connect within ``timeout_s``, or it cannot drop
    to ``CAPABILITIES``: a clear error at start, not a hang."""
    global _daemon_pid
    if enabled():
        return
    if method is None:
        method = priv_context.Method.FORK if os.geteuid() == 0 else priv_context.Method.ROOTWRAP
    # oslo.privsep's daemon logs every reply at DEBUG: the whole output of each root command.
    # Ours (brick.privileged.process) names the command and its exit code instead; the
    # daemon's records reach our log through the logger [brick_privsep] logger_name.
    for name in ("oslo.privsep.daemon", "oslo_privsep.daemon"):
        replies = logging.getLogger(name)
        replies.setLevel(max(replies.getEffectiveLevel(), logging.INFO))
    try:
        if method is priv_context.Method.ROOTWRAP:
            argv = _helper_argv()
            if shutil.which(argv[0]) is None:
                raise PrivsepUnavailable(
                    method.name,
                    f"{argv[0]!r} (of {shlex.join(argv)}) is not on PATH; set "
                    f"[{CFG_SECTION}] helper_command, or run as root (fork)",
                )
            with vmt_root.start_lock:
                if vmt_root.channel is None:
                    vmt_root.channel = _HelperChannel(vmt_root, timeout_s)
        else:
            vmt_root.start(method)
    except daemon.FailedToDropPrivileges as exc:
        raise PrivsepUnavailable(method.name, f"the daemon failed: {exc}") from None
    except OSError as exc:
        raise PrivsepUnavailable(method.name, str(exc)) from None
    vmt_root.set_client_mode(True)
    _daemon_pid = _pid()
    LOG.info(
        "privsep: daemon pid %d started (%s), capabilities %s",
        _daemon_pid,
        method.name,
        describe(),
    )


@vmt_root.entrypoint
def _pid() -> int:
    """The daemon's PID (for stop() to wait on; process.whoami says more, for the logs)."""
    return os.getpid()


def stop(timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop the privsep daemon and wait up to ``timeout_s`` for it to exit; entry points run
    in-process again. Idempotent.

    The daemon ends when its socket closes, but on its own time: a caller that exits right
    after closing would leave it (and whatever it is reaping) running behind it."""
    global _daemon_pid
    pid, _daemon_pid = _daemon_pid, None
    vmt_root.stop()
    vmt_root.set_client_mode(False)
    if pid is None:
        return

    def exited() -> bool:
        with contextlib.suppress(ChildProcessError):  # forked by us: reap it
            os.waitpid(pid, os.WNOHANG)
        return proc.is_gone(pid)

    try:
        wait_until(exited, timeout_s=timeout_s, what=f"privsep daemon pid {pid} to exit")
    except Timeout as exc:
        LOG.warning("privsep: %s", exc)
        return
    LOG.info("privsep: daemon pid %d exited", pid)


def describe() -> list[str]:
    """The kept capabilities by name, for logs and docs."""
    return [caps.CAPS_BYVALUE.get(c, str(c)) for c in CAPABILITIES]
