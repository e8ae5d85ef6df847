"""``TgtDaemon``: start, adopt and stop one ``tgtd`` (see :mod:`brick.tgt`)."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from brick import values
from brick.daemon import Supervisor
from brick.exception import (
    BrickError,
    CommandFailed,
    Conflict,
    InvalidArgument,
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
    ``nsenter --net=/var/run/netns/<netns>``, so only its network namespace differs. The
    process is handled by :class:`brick.daemon.Supervisor`; tgtd ignores SIGTERM, so it is
    asked to exit through ``tgtadm`` (SIGKILL by PID is the fallback).
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
        self.adm = TgtAdm(self.control_port)
        self.supervisor = Supervisor(
            f"tgtd -C {self.control_port}", self.pidfile, self._matches, netns=self.netns
        )

    def __repr__(self) -> str:
        return f"TgtDaemon(control_port={self.control_port}, portals={self.portals})"

    @property
    def pid(self) -> int | None:
        return self.supervisor.pid

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

    def _matches(self, argv: Sequence[str]) -> bool:
        """A tgtd with our ``-C N``."""
        if os.path.basename(argv[0]) != "tgtd":
            return False
        return any(
            argv[i] == "-C" and argv[i + 1] == str(self.control_port) for i in range(len(argv) - 1)
        )

    def running(self) -> bool:
        """Whether our tgtd process is alive and answers on its control port."""
        return self.alive() and self.adm.answers()

    def alive(self) -> bool:
        """Whether our tgtd process exists (no call on the control port: cheap enough to
        poll every second)."""
        return self.supervisor.alive()

    def adopt(self, *, timeout_s: float = 5.0) -> bool:
        """Take over a tgtd left running (by an earlier process) from the pidfile.

        Returns False if there is none (a stale pidfile is removed). Raises ``Conflict`` if
        it runs with other portals or in another network namespace than asked for.
        """

        def same_portals(pid: int, argv: Sequence[str]) -> None:
            if self._portal_arg() not in argv:
                raise Conflict(
                    "tgtd", f"pid {pid}", f"runs as {list(argv)}, not with {self.portals}"
                )

        pid = self.supervisor.adopt(same_portals)
        if pid is None:
            return False
        wait_until(
            self.adm.answers,
            timeout_s=timeout_s,
            what=f"tgtd pid {pid} to answer on control port {self.control_port}",
        )
        LOG.info("adopted tgtd pid %d (control port %d)", pid, self.control_port)
        return True

    # -- start / stop --------------------------------------------------------------------
    def start(self, *, timeout_s: float = 10.0) -> None:
        """Start tgtd and wait until it answers and listens on every portal.

        Idempotent if our tgtd already runs. Raises ``Conflict`` if another tgtd answers on
        the control port or a portal cannot be bound, ``CommandFailed`` if tgtd exits.
        """
        self.supervisor.check_netns()
        if self.adopt():
            return
        if self.adm.answers():
            raise Conflict(
                "tgtd control port", str(self.control_port), "another tgtd answers on it"
            )
        missing: set[str] = set()

        def listening() -> bool:
            return set(self.portals) <= _listening(self.pid or 0)

        def answers_and_listens() -> bool:
            try:
                if not self.adm.answers():
                    return False
            except Timeout:  # slow, not hung (a loaded TCG guest): the spawn's bound decides
                return False
            # tgtd binds its portals before it serves the control socket; this normally
            # holds at once and fails only when a portal could not be bound.
            wait_until(listening, timeout_s=0.5, what=f"tgtd to listen on {self.portals}")
            return True

        def failed() -> None:
            missing.update(set(self.portals) - _listening(self.pid or 0))
            self._stop_failed_start()

        try:
            self.supervisor.spawn(
                self.argv(),
                log=self.logfile,
                ready=answers_and_listens,
                timeout_s=timeout_s,
                on_failure=failed,
            )
        except Timeout as exc:
            if missing:
                raise Conflict(
                    "portal",
                    ",".join(sorted(missing)),
                    f"tgtd could not bind it: {self.supervisor.log_tail('portal')}",
                ) from exc
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
        if not self.supervisor.alive():
            self.supervisor.stop()  # forgets the child and removes the pidfile only
            return
        try:
            self.stop(timeout_s=5.0)
        except BrickError as exc:
            LOG.error("could not stop the tgtd that failed to start: %s", exc)

    def _ask_to_exit(self, answering: bool) -> None:
        """Delete every target and ask tgtd to exit (it ignores SIGTERM)."""
        if not answering:
            return
        for target in self.adm.targets():
            self.adm._delete_tid(target.tid)
        try:
            self.adm._run("--op", "delete", "--mode", "system")
        except CommandFailed as exc:
            LOG.warning("tgtd -C %d refused to exit: %s", self.control_port, exc)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Delete every target, ask tgtd to exit, wait for it; SIGKILL by PID only after
        ``timeout_s``. Removes the pidfile and the control socket files. Idempotent."""
        pid = self.supervisor.find()
        try:
            answering = self.adm.answers(timeout_s=min(5.0, timeout_s))
        except Timeout:  # hung: only SIGKILL (by PID) can end it
            LOG.warning("tgtd -C %d does not answer", self.control_port)
            answering = False
        if pid is not None:
            self.supervisor.stop(
                timeout_s=timeout_s,
                kill_timeout_s=timeout_s,
                graceful=lambda _pid: self._ask_to_exit(answering),
            )
        else:
            self._ask_to_exit(answering)
            if answering:
                wait_until(
                    lambda: not self.adm.answers(),
                    timeout_s=timeout_s,
                    what=f"tgtd -C {self.control_port} to exit",
                )
            self.supervisor.stop()  # forgets the child and removes the pidfile only
        for path in self.socket_files:
            path.unlink(missing_ok=True)
        if pid is not None:
            LOG.info("stopped tgtd pid %d (control port %d)", pid, self.control_port)
