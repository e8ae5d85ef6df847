"""virtlogd + libvirtd for ``qemu:///system`` on a machine without systemd.

``LibvirtDaemons(run_dir)`` keeps two pidfiles in ``run_dir`` (``virtlogd.pid``,
``libvirtd.pid``) and a warnings-level log of each daemon (``<daemon>.log``). ``start`` is
idempotent and never starts a second copy:

- a daemon of ours still running (its pidfile names a live process whose command line carries
  that pidfile) is adopted: we own it and ``stop`` ends it;
- a daemon that already answers (``qemu:///system`` opens, or ``virtlogd-sock`` accepts) but
  is not ours (systemd's, another user's) is used and never stopped;
- otherwise the daemon is started with ``-d -p <pidfile>``.

``stop`` ends only the processes this object started or adopted, by PID, after checking the
PID's command line (a reused PID is left alone): SIGTERM, then SIGKILL after the timeout.
With ``shared=True`` (processes that use one ``run_dir`` at the same time, e.g. test sessions)
each process counts itself a user in ``run_dir/users`` (``brick.sharing``) and ``stop`` ends
the daemons only if no other live user is left: the last one out stops them.
Running QEMU processes outlive libvirtd (that is libvirt's design): destroy the domains first.

Facts of libvirt 9.0 (Debian 12) that shape this module:

- ``-d`` forks; the parent exits once the daemon has set up its sockets and written the
  pidfile, and the daemon's stdio is /dev/null, so ``execute`` returns.
- The first start on a machine takes ~8 s before ``qemu:///system`` answers (libvirtd probes
  the QEMU binaries); later starts ~0.2 s (the capabilities are cached in /var/cache/libvirt).
- The daemons must run in the root mount namespace: QEMU is started by libvirtd and must see
  the FUSE exports and the files the caller passes. Start them from a process in that namespace
  (``brick.netns`` keeps it: it only changes the network namespace of its processes).
- libvirt re-probes QEMU (4-8 s, and several times per domain start: a boot took 50 s
  instead of 1) on *every* capabilities lookup when ``/dev/kvm`` exists but its QEMU user
  (``libvirt-qemu``, primary group ``kvm``) cannot open it: the cached probe says "KVM" and
  the validity check, made as that user, says "no KVM" (debug log: ``KVM was enabled when
  probing ..., but it is not available now``). Debian's udev makes the node ``root:kvm 0660``;
  without udev it is ``root:root 0600``. ``kvm_device_problem`` detects that, and
  ``LibvirtDaemons(fix_kvm_device=True)`` applies udev's ownership (the only host change made
  here; domains of ``type='qemu'`` still run TCG).
- A client without a daemon gets ``Failed to connect socket to '/var/run/libvirt/libvirt-sock'``;
  the C library would print each such error on stderr unless a handler is registered
  (``quiet_libvirt``).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import socket
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import libvirt

from brick.closing import Closing
from brick.daemon import Supervisor
from brick.exception import InvalidArgument
from brick.sharing import SharedUse
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

SYSTEM_URI = "qemu:///system"
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
KVM_DEVICE = Path("/dev/kvm")
QEMU_USER = "libvirt-qemu"  # Debian's default ``user`` of /etc/libvirt/qemu.conf
DAEMONS = ("virtlogd", "libvirtd")  # start order; stop runs in reverse
_quiet = False


def quiet_libvirt() -> None:
    """Stop libvirt's C library from printing every error on stderr (they are still raised
    as ``libvirt.libvirtError``). Process-wide, idempotent."""
    global _quiet
    if not _quiet:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _quiet = True


def libvirt_answers(uri: str = SYSTEM_URI) -> bool:
    """Whether a libvirt daemon serves ``uri`` right now."""
    quiet_libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getLibVersion()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def kvm_device_problem(device: Path = KVM_DEVICE, user: str = QEMU_USER) -> str | None:
    """Why libvirt's QEMU ``user`` cannot open ``device`` read-write, or None if it can or if
    there is no such device or user (see the module docstring)."""
    try:
        info = device.stat()
        account = pwd.getpwnam(user)
    except (OSError, KeyError):
        return None
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    mode = stat.S_IMODE(info.st_mode)
    if (
        (info.st_uid == account.pw_uid and mode & 0o600 == 0o600)
        or (info.st_gid in groups and mode & 0o060 == 0o060)
        or mode & 0o006 == 0o006
    ):
        return None
    owner = f"{info.st_uid}:{info.st_gid}"
    return f"{device} is {stat.filemode(info.st_mode)} {owner}, not usable by {user}"


def fix_kvm_device(device: Path = KVM_DEVICE, user: str = QEMU_USER) -> bool:
    """Give ``device`` udev's Debian ownership (group = ``user``'s primary group, here
    ``kvm``, mode 0660) if ``kvm_device_problem``; returns whether it changed anything."""
    problem = kvm_device_problem(device, user)
    if problem is None:
        return False
    os.chown(device, -1, pwd.getpwnam(user).pw_gid)
    os.chmod(device, 0o660)
    LOG.warning("%s: made it %s group-rw, as udev does", problem, device)
    return True


def _virtlogd_answers() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(VIRTLOGD_SOCKET))
        except OSError:
            return False
    return True


class LibvirtDaemons(Closing):
    """virtlogd and libvirtd serving ``qemu:///system``, started or adopted; see the module
    docstring. Usable as a context manager (``stop`` on exit)."""

    def __init__(
        self,
        run_dir: Path | str,
        *,
        uri: str = SYSTEM_URI,
        start_timeout_s: float = 60.0,
        fix_kvm_device: bool = False,
        shared: bool = False,
    ) -> None:
        text = os.fspath(run_dir)
        if not isinstance(text, str) or not os.path.isabs(text):
            raise InvalidArgument("run_dir", run_dir, "must be an absolute path")
        self.run_dir = Path(os.path.normpath(text))
        self.uri = uri
        self.start_timeout_s = start_timeout_s
        self.fix_kvm_device = fix_kvm_device
        self._owned: dict[str, int] = {}  # daemon -> PID we started or adopted
        self._supervisors = {
            daemon: Supervisor(daemon, self.pidfile(daemon), self._matcher(daemon))
            for daemon in DAEMONS
        }
        self._use = SharedUse(self.run_dir / "users") if shared else None

    def __repr__(self) -> str:
        return f"LibvirtDaemons({str(self.run_dir)!r}, owned={self._owned})"

    def __enter__(self) -> Self:
        self.start()
        return self

    def close(self) -> None:
        """The ``with`` block's end: :meth:`stop` with its default timeout."""
        self.stop()

    def pidfile(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    def logfile(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.log"

    @property
    def owned(self) -> dict[str, int]:
        """The daemons we own (started or adopted) that still run: name -> PID."""
        return {d: pid for d, pid in self._owned.items() if self._is_ours(d, pid)}

    def _matcher(self, daemon: str) -> Callable[[Sequence[str]], bool]:
        pidfile = str(self.pidfile(daemon))

        def matches(argv: Sequence[str]) -> bool:
            """``daemon`` started with our pidfile."""
            return os.path.basename(argv[0]) == daemon and pidfile in argv

        return matches

    def _is_ours(self, daemon: str, pid: int) -> bool:
        """Whether ``pid`` is a live ``daemon`` started with our pidfile (not a reused PID)."""
        return self._supervisors[daemon].is_ours(pid)

    def _pid_from_file(self, daemon: str) -> int | None:
        found = self._supervisors[daemon].pidfile.read()
        return None if found is None else found[0]

    def _answers(self, daemon: str) -> bool:
        return _virtlogd_answers() if daemon == "virtlogd" else libvirt_answers(self.uri)

    def _ensure(self, daemon: str) -> None:
        pid = self._pid_from_file(daemon)
        if pid is not None and self._is_ours(daemon, pid):
            if daemon not in self._owned:
                LOG.info("adopted %s pid %d (%s)", daemon, pid, self.pidfile(daemon))
            self._owned[daemon] = pid
            return
        self._owned.pop(daemon, None)
        if self._answers(daemon):
            LOG.info("%s already runs and is not ours: using it, never stopping it", daemon)
            return
        env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"3:file:{self.logfile(daemon)}")
        argv = [daemon, "-d", "-p", str(self.pidfile(daemon))]
        pid = self._supervisors[daemon].daemonize(argv, env=env)  # a stale pidfile goes first
        self._owned[daemon] = pid
        LOG.info("started %s pid %d", daemon, pid)

    def adopt(self) -> bool:
        """Take over the daemons a previous process started with our pidfiles (so that
        ``stop`` ends them); start nothing. True if any was found."""
        for daemon in DAEMONS:
            pid = self._pid_from_file(daemon)
            if pid is not None and self._is_ours(daemon, pid):
                self._owned[daemon] = pid
                LOG.info("adopted %s pid %d (%s)", daemon, pid, self.pidfile(daemon))
        return bool(self._owned)

    def start(self) -> None:
        """Make ``uri`` answer: adopt, use or start each daemon, then wait (``start_timeout_s``)
        until libvirtd answers. With ``fix_kvm_device``, fix /dev/kvm's group first. On failure
        the daemons started here are stopped again (shared: unless another user is left).
        Raises ``CommandFailed`` if a daemon does not start, ``Timeout`` if it never answers."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.fix_kvm_device:
            fix_kvm_device()
        elif (problem := kvm_device_problem()) is not None:
            LOG.warning("%s: libvirt will re-probe QEMU on every call (slow)", problem)
        with self._exclusive():
            if self._use is not None:
                self._use.join()
            try:
                for daemon in DAEMONS:
                    self._ensure(daemon)
                wait_until(
                    lambda: libvirt_answers(self.uri),
                    timeout_s=self.start_timeout_s,
                    what=f"libvirtd to answer on {self.uri}",
                    interval_s=0.05,
                )
            except BaseException:
                self._stop()
                raise

    def stop(self, *, timeout_s: float = 15.0) -> None:
        """End the daemons we own, libvirtd first, by PID (shared: only if no other live
        user is left; else they are no longer ours); idempotent. ``Timeout`` only if a
        process outlives SIGKILL."""
        with self._exclusive():
            self._stop(timeout_s)

    def _exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._use.locked() if self._use is not None else contextlib.nullcontext()

    def _stop(self, timeout_s: float = 15.0) -> None:
        if self._use is not None and not self._use.leave():
            LOG.info("libvirt daemons %s left running for pids %s", self._owned, self._use.others())
            self._owned.clear()
            return
        for daemon in reversed(DAEMONS):
            pid = self._owned.pop(daemon, None)
            if pid is None or not self._is_ours(daemon, pid):
                continue
            supervisor = self._supervisors[daemon]
            supervisor.pid = pid
            supervisor.stop(timeout_s=timeout_s)  # SIGTERM, SIGKILL after timeout_s
            LOG.info("stopped %s pid %d", daemon, pid)
