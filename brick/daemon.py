"""One supervisor for every daemon we run (tgtd, virtlogd/libvirtd, qemu-storage-daemon,
guest QEMUs, ...).

A daemon is known by a **pidfile** and recognised as **ours** only if the PID still runs
(a zombie does not), its command line passes the daemon's own check (``matches``), and, when
its start time was recorded, the process started at that time: a reused PID is never taken
for ours, and nothing is signalled before that check. ``Supervisor`` does the rest the same
way for all of them:

- ``spawn``: start a foreground process in its own session (it outlives us; a restarted
  owner adopts it; a root daemon of ``brick.privileged.process.ROOT_DAEMONS`` is started by
  the privsep daemon's ``spawn_root`` when privsep is on), write the pidfile (``<pid>``,
  atomically; the start time is kept in memory, so a restarted owner checks the command
  line only), and wait until
  ``ready`` says so; an exit before that raises ``CommandFailed`` with the tail of its log,
  and a start that times out is stopped again.
- ``daemonize``: run a command that forks and writes the pidfile itself (``libvirtd -d -p``,
  ``qemu-storage-daemon --daemonize --pidfile``), then check the PID it wrote.
- ``adopt``: take over the process a pidfile names (a stale pidfile is removed); with a
  network namespace given, ``Conflict`` if the process runs in another one.
- ``stop``: an optional graceful request (tgtd ignores SIGTERM and exits through
  ``tgtadm``), else SIGTERM; SIGKILL once ``timeout_s`` has passed; ``Timeout`` only if the
  process outlives SIGKILL by ``kill_timeout_s``. By PID only, after the is-ours check.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import brick.privileged
import brick.privileged.process
from brick import proc
from brick.exception import CommandFailed, Conflict, NotFound, Timeout
from brick.executor import execute
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
KILL_TIMEOUT_S = 5.0


# -- facts about one process (pure reads of /proc) ---------------------------------------------
def start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot); None if it is gone or a zombie."""
    if pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def netns_identity(netns: str | None) -> tuple[int, int]:
    """(device, inode) of a named network namespace, or of ours for None."""
    path = NETNS_DIR / netns if netns else Path("/proc/self/ns/net")
    info = os.stat(path)
    return info.st_dev, info.st_ino


def process_netns(pid: int) -> tuple[int, int] | None:
    """(device, inode) of the network namespace of ``pid``; None if it is gone."""
    try:
        info = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return info.st_dev, info.st_ino


def terminate(
    pid: int,
    is_ours: Callable[[int], bool],
    *,
    what: str,
    timeout_s: float,
    kill_timeout_s: float = KILL_TIMEOUT_S,
    send_term: bool = True,
    ended: Callable[[], bool] | None = None,
) -> None:
    """SIGTERM (unless ``send_term`` is False: the caller asked it to exit another way), wait
    ``timeout_s``, then SIGKILL and wait ``kill_timeout_s``. Signals only while ``is_ours``.
    ``ended`` overrides how the end is seen (a child of ours: ``Popen.poll``)."""

    def gone() -> bool:
        return ended() if ended is not None else proc.ended(pid, is_ours)

    if gone():
        return
    if send_term and is_ours(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        wait_until(gone, timeout_s=timeout_s, what=f"{what} pid {pid} to exit")
        return
    except Timeout:
        LOG.warning("%s pid %d did not exit in %g s: SIGKILL", what, pid, timeout_s)
    if is_ours(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(gone, timeout_s=kill_timeout_s, what=f"{what} pid {pid} to die after SIGKILL")


# -- the pidfile ------------------------------------------------------------------------------
class Pidfile:
    """``<pid>\\n`` (what daemons that write their own pidfile write, and what other tools
    read), written atomically; a second word, if any, is taken as the start time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Pidfile({str(self.path)!r})"

    def read(self) -> tuple[int, int | None] | None:
        """(pid, start time or None); None if there is no (readable) pidfile."""
        try:
            words = self.path.read_text().split()
        except OSError:
            return None
        if not words or not words[0].isascii() or not words[0].isdigit():
            return None
        started = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
        return int(words[0]), started

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(f"{pid}\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# -- the supervisor ---------------------------------------------------------------------------
class Supervisor:
    """One daemon process: its pidfile, how to recognise it, and start / adopt / stop.

    :param name: what logs and errors call it (``tgtd -C 3260``).
    :param pidfile: where its PID is kept.
    :param matches: whether a command line (argv) is this daemon's (say, ``tgtd`` with our
        ``-C N``); the first check against PID reuse.
    :param netns: the network namespace it must run in (None: ours).
    """

    def __init__(
        self,
        name: str,
        pidfile: Path,
        matches: Callable[[Sequence[str]], bool],
        *,
        netns: str | None = None,
    ) -> None:
        self.name = name
        self.pidfile = Pidfile(pidfile)
        self.matches = matches
        self.netns = netns
        self.pid: int | None = None
        self.started: int | None = None  # start time of self.pid, when known
        self.child: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"Supervisor({self.name!r}, pid={self.pid})"

    # -- which process is ours ---------------------------------------------------------------
    def is_ours(self, pid: int, started: int | None = None) -> bool:
        """Whether ``pid`` runs (not a zombie), its argv matches, and (if a start time is
        known for it) it started then."""
        if self.child is not None and self.child.pid == pid:
            self.child.poll()  # reap it if it has exited
        if proc.is_gone(pid):
            return False
        argv = proc.cmdline(pid)
        if not argv or not self.matches(argv):
            return False
        if started is None and pid == self.pid:
            started = self.started
        return started is None or start_time(pid) == started

    def find(self) -> int | None:
        """The PID of our process (known, or from the pidfile), or None."""
        if self.pid is not None and self.is_ours(self.pid, self.started):
            return self.pid
        found = self.pidfile.read()
        if found is not None and self.is_ours(*found):
            return found[0]
        return None

    def alive(self) -> bool:
        return self.find() is not None

    def in_netns(self, pid: int) -> bool:
        """Whether ``pid`` runs in our network namespace (``netns``)."""
        theirs = process_netns(pid)
        return theirs is not None and theirs == netns_identity(self.netns)

    def check_netns(self) -> None:
        """``NotFound`` if the named network namespace does not exist."""
        if self.netns is not None and not (NETNS_DIR / self.netns).exists():
            raise NotFound("network namespace", self.netns)

    # -- adopt -------------------------------------------------------------------------------
    def adopt(self, check: Callable[[int, Sequence[str]], None] | None = None) -> int | None:
        """Take over the process our pidfile names; None if there is none (a stale pidfile
        is removed). ``Conflict`` if it runs in another network namespace; ``check(pid,
        argv)`` may raise ``Conflict`` for other differences (other portals, say)."""
        found = self.pidfile.read()
        if found is None or not self.is_ours(*found):
            if found is not None:
                LOG.info("removing stale pidfile %s (pid %d is gone)", self.pidfile.path, found[0])
                self.pidfile.remove()
            return None
        pid = found[0]
        if check is not None:
            check(pid, proc.cmdline(pid))
        theirs = process_netns(pid)
        if theirs is None:
            return None  # it ended meanwhile
        if theirs != netns_identity(self.netns):
            where = self.netns or "of this process"
            raise Conflict(self.name, f"pid {pid}", f"not in network namespace {where}")
        self.pid, self.started = pid, found[1] if found[1] is not None else start_time(pid)
        return pid

    # -- start -------------------------------------------------------------------------------
    def spawn(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        ready: Callable[[], bool],
        timeout_s: float,
        env: Mapping[str, str] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> int:
        """Start ``argv`` in the background (its output appended to ``log``), record it in
        the pidfile, and wait until ``ready()``. ``CommandFailed`` if it exits first (with
        the tail of its log), ``Timeout`` if not ready in time; either way the process is
        stopped again (``on_failure`` instead of ``stop`` when given)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        exited: Callable[[], int | None]
        with open(log, "ab") as out:
            self._log, self._log_offset = log, out.tell()
            if brick.privileged.enabled() and brick.privileged.process.is_root_daemon(argv):
                # a root daemon (tgtd): the privsep daemon starts it, checked, and reaps it
                self.child = None
                pid = brick.privileged.process.spawn_root(
                    list(argv), str(log.absolute()), None if env is None else dict(env)
                )
                exited = functools.partial(brick.privileged.process.spawned_exit, pid)
            else:
                try:
                    self.child = subprocess.Popen(
                        list(argv),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=None if env is None else dict(env),
                        start_new_session=True,  # outlives us; a restarted owner adopts it
                        close_fds=True,
                    )
                except FileNotFoundError as exc:
                    raise CommandFailed(argv, 127, f"{exc.filename}: not found") from None
                pid, exited = self.child.pid, self.child.poll
        self.pid, self.started = pid, start_time(pid)
        self.pidfile.write(self.pid)
        LOG.debug("started %s as pid %d", list(argv), self.pid)

        def up() -> bool:
            code = exited()
            if code is not None:
                raise CommandFailed(argv, code, self.log_tail())
            return ready()

        try:
            wait_until(up, timeout_s=timeout_s, what=f"{self.name} to be ready")
        except BaseException:
            (on_failure or self.stop_failed_start)()
            raise
        return self.pid

    def daemonize(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> int:
        """Run a command that forks the daemon and writes our pidfile itself (in
        ``timeout_s``); return the PID it wrote, checked. ``NotFound`` if the pidfile names no
        process of ours."""
        self.pidfile.remove()  # stale: whatever it named is not ours
        execute(list(argv), timeout_s=timeout_s, env=None if env is None else dict(env))
        found = self.pidfile.read()
        if found is None or not self.is_ours(found[0]):
            raise NotFound(f"{self.name} process", f"pidfile {self.pidfile.path} ({found})")
        self.pid, self.started = found[0], start_time(found[0])
        return self.pid

    def log_tail(self, containing: str = "") -> str:
        """The last lines the process logged since ``spawn`` (those with ``containing``)."""
        if self._log is None:
            return "no log"
        try:
            with open(self._log, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "no log"
        lines = [line for line in text.strip().splitlines() if containing in line]
        return " | ".join(lines[-4:]) or "nothing logged"

    # -- stop --------------------------------------------------------------------------------
    def stop_failed_start(self) -> None:
        """Stop the process ``spawn`` launched, and only it; if it has already exited,
        nothing else is touched."""
        try:
            self.stop(timeout_s=KILL_TIMEOUT_S)
        except Timeout as exc:
            LOG.error("could not stop the %s that failed to start: %s", self.name, exc)

    def stop(
        self,
        *,
        timeout_s: float = 10.0,
        kill_timeout_s: float = KILL_TIMEOUT_S,
        graceful: Callable[[int], None] | None = None,
    ) -> int | None:
        """End our process: ``graceful(pid)`` (a request to exit) or SIGTERM, SIGKILL after
        ``timeout_s``. Removes the pidfile; returns the PID that ended (None if none ran).
        Idempotent; ``Timeout`` only if the process outlives SIGKILL."""
        pid = self.find()
        child = self.child if self.child is not None and self.child.pid == pid else None
        if pid is not None:
            started = self.started if pid == self.pid else None

            def ours(p: int) -> bool:
                return self.is_ours(p, started)

            if graceful is not None:
                graceful(pid)
            terminate(
                pid,
                ours,
                what=self.name,
                timeout_s=timeout_s,
                kill_timeout_s=kill_timeout_s,
                send_term=graceful is None,
                ended=None if child is None else (lambda: child.poll() is not None),
            )
        if self.child is not None:
            self.child.poll()
            self.child = None
        self.pidfile.remove()
        self.pid = self.started = None
        return pid
