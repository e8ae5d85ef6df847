"""``TgtDaemon``: start, adopt and stop one ``tgtd`` (see :mod:`brick.tgt`)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from brick import proc, values
from brick.exception import (
    BrickError,
    CommandFailed,
    Conflict,
    InvalidArgument,
    NotFound,
    Timeout,
)
from brick.tgt.adm import TgtAdm
from brick.tgt.parse import validate_control_port, validate_netns, validate_portal
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/tgtd")
NETNS_DIR = Path("/var/run/netns")


# -- tgtd ------------------------------------------------------------------------------------
def _listening(pid: int) -> set[str]:
    """``ip:port`` (``[v6]:port``) of the TCP sockets that process ``pid`` listens on."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    found = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, _, hex_port = cols[1].partition(":")
            if len(hex_ip) != width:
                continue
            raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, width, 8))
            address = ipaddress.ip_address(raw)
            found.add(values.join_host_port(str(address), int(hex_port, 16)))
    return found


class TgtDaemon:
    """One ``tgtd -f -C N --iscsi portal=...`` process, started in the background.

    Files: ``run_dir/tgtd-N.log`` (its output), ``run_dir/tgtd-N.pid``, and tgtd's own
    ``/var/run/tgtd/socket.N`` + ``.lock``. With ``netns``, tgtd is started through
    ``nsenter --net=/var/run/netns/<netns>``, so only its network namespace differs.
    """

    def __init__(
        self,
        control_port: int,
        portals: Iterable[str],
        *,
        run_dir: Path,
        netns: str | None = None,
    ) -> None:
        self.control_port = validate_control_port(control_port)
        if isinstance(portals, str):
            raise InvalidArgument("portals", portals, "must be a list of ip:port")
        self.portals = [validate_portal(p, "portals") for p in portals]
        if not self.portals:
            raise InvalidArgument("portals", portals, "needs at least one ip:port")
        self.run_dir = Path(run_dir)
        self.netns = None if netns is None else validate_netns(netns)
        self.pid: int | None = None
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self.adm = TgtAdm(self.control_port)

    def __repr__(self) -> str:
        return f"TgtDaemon(control_port={self.control_port}, portals={self.portals})"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"tgtd-{self.control_port}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"tgtd-{self.control_port}.log"

    @property
    def socket_files(self) -> tuple[Path, Path]:
        sock = SOCKET_DIR / f"socket.{self.control_port}"
        return sock, sock.with_name(sock.name + ".lock")

    def _portal_arg(self) -> str:
        # "portal=a,b" silently drops b: every portal needs its own "portal=".
        return ",".join(f"portal={p}" for p in self.portals)

    def argv(self) -> list[str]:
        base = ["tgtd", "-f", "-C", str(self.control_port), "--iscsi", self._portal_arg()]
        if self.netns is None:
            return base
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", *base]

    # -- which process is ours -----------------------------------------------------------
    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live tgtd with our ``-C N`` (guards against PID reuse)."""
        if self._proc is not None and self._proc.pid == pid:
            self._proc.poll()  # reap it if it has exited
        if proc.is_gone(pid):
            return False
        argv = proc.cmdline(pid)
        if not argv or os.path.basename(argv[0]) != "tgtd":
            return False
        return any(
            argv[i] == "-C" and argv[i + 1] == str(self.control_port) for i in range(len(argv) - 1)
        )

    def _pid_from_file(self) -> int | None:
        try:
            text = self.pidfile.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def _known_pid(self) -> int | None:
        for pid in (self.pid, self._pid_from_file()):
            if pid is not None and self._is_ours(pid):
                return pid
        return None

    def _netns_inode(self) -> tuple[int, int]:
        path = NETNS_DIR / self.netns if self.netns else Path("/proc/self/ns/net")
        info = os.stat(path)
        return info.st_dev, info.st_ino

    def running(self) -> bool:
        """Whether our tgtd process is alive and answers on its control port."""
        return self.alive() and self.adm.answers()

    def alive(self) -> bool:
        """Whether our tgtd process exists (no call on the control port: cheap enough to
        poll every second)."""
        return self._known_pid() is not None

    def adopt(self, *, timeout_s: float = 5.0) -> bool:
        """Take over a tgtd left running (by an earlier process) from the pidfile.

        Returns False if there is none (a stale pidfile is removed). Raises ``Conflict`` if
        it runs with other portals or in another network namespace than asked for.
        """
        pid = self._pid_from_file()
        if pid is None or not self._is_ours(pid):
            if pid is not None:
                LOG.info("removing stale pidfile %s (pid %d is gone)", self.pidfile, pid)
                self.pidfile.unlink(missing_ok=True)
            return False
        argv = proc.cmdline(pid)
        if self._portal_arg() not in argv:
            raise Conflict("tgtd", f"pid {pid}", f"runs as {argv}, not with {self.portals}")
        try:
            theirs = os.stat(f"/proc/{pid}/ns/net")
            if (theirs.st_dev, theirs.st_ino) != self._netns_inode():
                raise Conflict("tgtd", f"pid {pid}", f"not in network namespace {self.netns}")
        except FileNotFoundError:
            return False
        wait_until(
            self.adm.answers,
            timeout_s=timeout_s,
            what=f"tgtd pid {pid} to answer on control port {self.control_port}",
        )
        self.pid = pid
        LOG.info("adopted tgtd pid %d (control port %d)", pid, self.control_port)
        return True

    # -- start / stop --------------------------------------------------------------------
    def start(self, *, timeout_s: float = 10.0) -> None:
        """Start tgtd and wait until it answers and listens on every portal.

        Idempotent if our tgtd already runs. Raises ``Conflict`` if another tgtd answers on
        the control port or a portal cannot be bound, ``CommandFailed`` if tgtd exits.
        """
        if self.netns is not None and not (NETNS_DIR / self.netns).exists():
            raise NotFound("network namespace", self.netns)
        if self.adopt():
            return
        if self.adm.answers():
            raise Conflict(
                "tgtd control port", str(self.control_port), "another tgtd answers on it"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        with open(self.logfile, "ab") as log:
            self._log_offset = log.tell()
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives us; a restarted owner adopts it
                    close_fds=True,
                )
            except FileNotFoundError as exc:
                raise CommandFailed(argv, 127, f"{exc.filename}: not found") from None
        self.pid = self._proc.pid
        tmp = self.pidfile.with_suffix(".pid.tmp")
        tmp.write_text(f"{self.pid}\n")
        os.replace(tmp, self.pidfile)
        LOG.debug("started %s as pid %d", argv, self.pid)

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise CommandFailed(argv, self._proc.returncode, self._log_tail())
            return self.adm.answers()

        def listening() -> bool:
            return set(self.portals) <= _listening(self.pid or 0)

        try:
            wait_until(ready, timeout_s=timeout_s, what=f"tgtd -C {self.control_port} to answer")
            # tgtd binds its portals before it serves the control socket; this normally
            # holds at once and fails only when a portal could not be bound.
            wait_until(listening, timeout_s=0.5, what=f"tgtd to listen on {self.portals}")
        except Timeout as exc:
            missing = set(self.portals) - _listening(self.pid or 0)
            self._stop_failed_start()
            if missing:
                raise Conflict(
                    "portal",
                    ",".join(sorted(missing)),
                    f"tgtd could not bind it: {self._log_tail('portal')}",
                ) from exc
            raise
        except BaseException:
            self._stop_failed_start()
            raise
        LOG.info(
            "tgtd pid %d serves %s (control port %d%s)",
            self.pid,
            ",".join(self.portals),
            self.control_port,
            f", netns {self.netns}" if self.netns else "",
        )

    def _stop_failed_start(self) -> None:
        """Stop the tgtd this start launched, and only it: if it has already exited (say,
        another tgtd holds the control port's lock), nothing else is touched."""
        if self._known_pid() is None:
            if self._proc is not None:
                self._proc.poll()
            self._proc, self.pid = None, None
            self.pidfile.unlink(missing_ok=True)
            return
        try:
            self.stop(timeout_s=5.0)
        except BrickError as exc:
            LOG.error("could not stop the tgtd that failed to start: %s", exc)

    def _log_tail(self, containing: str = "") -> str:
        """The last lines tgtd logged since this start (those with ``containing``)."""
        try:
            with open(self.logfile, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "no log"
        lines = [line for line in text.strip().splitlines() if containing in line]
        return " | ".join(lines[-4:]) or "nothing logged"

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Delete every target, ask tgtd to exit, wait for it; SIGKILL by PID only after
        ``timeout_s``. Removes the pidfile and the control socket files. Idempotent."""
        pid = self._known_pid()
        try:
            answering = self.adm.answers(timeout_s=min(5.0, timeout_s))
        except Timeout:  # hung: only SIGKILL (by PID) can end it
            LOG.warning("tgtd -C %d does not answer", self.control_port)
            answering = False
        if answering:
            for target in self.adm.targets():
                self.adm._delete_tid(target.tid)
            try:
                self.adm._run("--op", "delete", "--mode", "system")
            except CommandFailed as exc:
                LOG.warning("tgtd -C %d refused to exit: %s", self.control_port, exc)
        if pid is not None:
            try:
                wait_until(
                    lambda: proc.ended(pid, self._is_ours),
                    timeout_s=timeout_s,
                    what=f"tgtd pid {pid} to exit",
                )
            except Timeout:
                LOG.warning("tgtd pid %d did not exit in %g s: SIGKILL", pid, timeout_s)
                if self._is_ours(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                wait_until(
                    lambda: proc.ended(pid, self._is_ours),
                    timeout_s=timeout_s,
                    what=f"tgtd pid {pid} to die after SIGKILL",
                )
        elif answering:
            wait_until(
                lambda: not self.adm.answers(),
                timeout_s=timeout_s,
                what=f"tgtd -C {self.control_port} to exit",
            )
        if self._proc is not None:
            self._proc.poll()
            self._proc = None
        for path in self.socket_files:
            path.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        if pid is not None:
            LOG.info("stopped tgtd pid %d (control port %d)", pid, self.control_port)
        self.pid = None
