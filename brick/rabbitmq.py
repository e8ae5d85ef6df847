"""A private RabbitMQ broker for the control bus (docs/bus.rst): Debian's ``rabbitmq-server``
run with its own data directory, Erlang cookie, node name and ports, on one address
(loopback, or a lab host's address inside its network namespace). Never the system's
default instance: everything it writes is under ``workdir``.

Two daemons, each under a ``brick.daemon.Supervisor`` (stopped by PID only):

- ``epmd`` (Erlang's port mapper) on ``epmd_port``, bound to ``address``; started first,
  in the foreground, so that the broker does not fork one of its own that would outlive it;
- the broker itself (``beam.smp``: the start script execs it, so the PID we spawn is the
  broker's), AMQP on ``port``, Erlang distribution on ``dist_port``.

``stop`` ends the broker with SIGTERM by PID (a graceful shutdown: Erlang/OTP >= 20 runs
``init:stop()`` on it, as ``rabbitmqctl stop`` does), SIGKILL if it outlives the timeout,
then stops epmd the same way.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

from brick import proc, values
from brick.daemon import Supervisor, start_time
from brick.exception import NotFound
from brick.executor import execute
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # the script, without Debian's su
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
START_TIMEOUT_S = 60.0  # a cold start takes ~3 s here; first boot of a data dir ~5 s


def available() -> bool:
    """Whether Debian's rabbitmq-server (and Erlang's epmd) are installed."""
    return SERVER.exists() and CTL.exists() and shutil.which("epmd") is not None


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


class RabbitMQ:
    """One private broker. ``user``/``password``: the only account (created on first boot);
    it may connect from any address the broker listens on (``loopback_users = none``), so
    that lab hosts in other namespaces can use it.

    :param workdir: its data (mnesia), logs, config, cookie and pidfiles.
    :param address: the one address it listens on (AMQP, distribution, epmd).
    :param port: AMQP port; ``dist_port`` defaults to ``port + 20000`` and ``epmd_port`` to
        ``port - 1000``; ``rabbitmqctl`` uses ``dist_port + 1``.
    :param netns: run inside this network namespace (``nsenter --net``), e.g. a lab host's.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        address: str = "127.0.0.1",
        port: int = 5672,
        dist_port: int | None = None,
        epmd_port: int | None = None,
        netns: str | None = None,
        user: str = "vmthunder",
        password: str | None = None,
        name: str = "vmt",
    ) -> None:
        self.workdir = workdir
        self.address = address
        self.port = port
        self.dist_port = dist_port or port + 20000
        self.epmd_port = epmd_port or port - 1000
        self.netns = netns
        self.user = user
        self.password = password or secrets.token_hex(12)
        self.node = f"{name}-{port}@localhost"
        self.broker = Supervisor(
            f"rabbitmq-server {self.node}",
            workdir / "rabbitmq.pid",
            self._is_broker,
            netns=netns,
        )
        self.epmd = Supervisor(
            f"epmd -port {self.epmd_port}",
            workdir / "epmd.pid",
            self._is_epmd,
            netns=netns,
        )

    @property
    def transport_url(self) -> str:
        """The oslo.messaging URL of this broker (default vhost)."""
        return f"rabbit://{self.user}:{self.password}@{values.bracket(self.address)}:{self.port}/"

    # -- recognising our processes ---------------------------------------------------------
    def _is_broker(self, argv: Sequence[str]) -> bool:
        # beam.smp's argv names no node (it comes from the environment) but its home: ours.
        args = list(argv)
        home = str(self.workdir)
        return (
            bool(args)
            and Path(args[0]).name.startswith("beam")
            and any(a == "-home" and b == home for a, b in itertools.pairwise(args))
        )

    def _is_epmd(self, argv: Sequence[str]) -> bool:
        return bool(argv) and Path(argv[0]).name == "epmd" and str(self.epmd_port) in list(argv[1:])

    # -- environment -------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        w = self.workdir
        ip = self.address.strip("[]")
        # Erlang distribution (rabbitmqctl ↔ broker) on ``address`` only, on loopback; in a
        # namespace of its own it also needs loopback (rabbitmqctl reaches node@localhost),
        # and the namespace is the boundary.
        erl_ip = "{" + ",".join(ip.split(".")) + "}" if ip == "127.0.0.1" else None
        epmd_ip = ip if ip == "127.0.0.1" else f"127.0.0.1,{ip}"
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(w),  # the Erlang cookie: $HOME/.erlang.cookie
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": ip,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.dist_port + 1),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.dist_port + 10),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": epmd_ip,
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_LOGS": str(w / "log" / "rabbit.log"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq-own.pid"),
        }
        if erl_ip is not None:
            env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = f"-kernel inet_dist_use_interface {erl_ip}"
        return env

    def _prepare(self) -> None:
        w = self.workdir
        for sub in ("mnesia", "log"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        cookie = w / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(20))
        (w / "rabbitmq.conf").write_text(
            f"default_user = {self.user}\n"
            f"default_pass = {self.password}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (w / "advanced.config").write_text("[].\n")
        (w / "rabbitmq-env.conf").write_text("")
        (w / "enabled_plugins").write_text("[].\n")

    def _argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *argv] if self.netns else argv

    # -- life cycle ------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.broker.alive()

    def start(self, *, timeout_s: float = START_TIMEOUT_S) -> RabbitMQ:
        """Start epmd and the broker; return once AMQP answers on ``address:port``."""
        if not available():
            raise NotFound("rabbitmq-server", f"{SERVER} (apt-get install rabbitmq-server)")
        self.broker.check_netns()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        env = self._env()
        ip = env["RABBITMQ_NODE_IP_ADDRESS"]
        if self.epmd.adopt() is None:
            self.epmd.spawn(
                self._argv(
                    ["epmd", "-port", str(self.epmd_port), "-address", env["ERL_EPMD_ADDRESS"]]
                ),
                log=self.workdir / "log" / "epmd.out",
                ready=lambda: self._answers(self.epmd_port),
                timeout_s=10.0,
                env=env,
            )
        if self.broker.adopt() is None:
            own = self.workdir / "rabbitmq-own.pid"
            own.unlink(missing_ok=True)
            # The start script runs beam.smp as its child (it traps signals to stop it):
            # once AMQP answers, the broker's own pidfile names beam, which we keep.
            self.broker.spawn(
                self._argv([str(SERVER)]),
                log=self.workdir / "log" / "rabbitmq-server.out",
                ready=lambda: self._answers(self.port) and self._beam_pid() is not None,
                timeout_s=timeout_s,
                env=env,
            )
            pid = self._beam_pid()
            assert pid is not None
            self.broker.pid, self.broker.started = pid, start_time(pid)
            self.broker.pidfile.write(pid)
        LOG.info("rabbitmq-server %s ready on %s:%d", self.node, ip, self.port)
        return self

    def _beam_pid(self) -> int | None:
        """The broker's PID from the pidfile it writes itself, if that process is ours."""
        try:
            pid = int((self.workdir / "rabbitmq-own.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_broker(proc.cmdline(pid)) else None

    def _answers(self, port: int) -> bool:
        if self.netns is None:
            return _port_open(self.address.strip("[]"), port)
        # Inside a namespace: ask from there (never address a namespace's IP from here).
        result = execute(
            self._argv(["bash", "-c", f"exec 3<>/dev/tcp/{self.address.strip('[]')}/{port}"]),
            check_exit_code=False,
            timeout_s=5,
        )
        return result.exit_code == 0

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Stop the broker (SIGTERM by PID: Erlang/OTP >= 20 shuts the node down as
        ``rabbitmqctl stop`` does, without starting that command's own Erlang VM; SIGKILL
        after ``timeout_s``) and epmd. Idempotent."""
        try:
            self.broker.stop(timeout_s=timeout_s)
        finally:
            self.epmd.stop(timeout_s=5.0)

    def kill(self) -> int | None:
        """SIGKILL the broker at once (a crash, for tests); epmd stays. Its PID, or None."""
        pid = self.broker.find()
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)  # find() checked it is ours
        # An exiting beam (hundreds of threads) has already dropped its command line, so
        # find() no longer calls it ours: wait for the exit itself before reaping.
        wait_until(lambda: proc.is_gone(pid), timeout_s=10, what=f"beam pid {pid} to exit")
        self.broker.stop(timeout_s=5.0)  # reaps it and removes the pidfile
        return pid
