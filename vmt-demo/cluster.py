"""A VMThunder cluster on one machine: Volt, an image server and N compute nodes, each in
its own network namespace on a private bridge (brick.netns), driven from a control host.

Nothing here sends a packet from the root namespace to a namespace address: daemons are
checked through their logs and every RPC runs inside the control namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rpcclient

from brick import psk
from brick.exception import BrickError
from brick.netns import Host, Lab, enter_in_thread, netns_inode, pids_in_netns
from brick.qsd.mounts import unmount_dead_fuse_exports
from brick.rabbitmq import RabbitMQ
from brick.wait import wait_until
from volt.auth import node_token

PYTHON = sys.executable
RPC_CLIENT = Path(__file__).with_name("rpcclient.py")
TCP_LOSS_COUNTERS = {  # tcp_counters()'s names -> /proc/net/{snmp,netstat} "<group><key>"
    "retransmitted": "TcpRetransSegs",
    "timeouts": "TcpExtTCPTimeouts",
    "spurious_rtos": "TcpExtTCPSpuriousRTOs",
}
VOLT_SNIPPET = (
    "import json, sys\n"
    "from voltclient import Client\n"
    "from voltclient.exceptions import NotFound\n"
    "url, token, image = sys.argv[1:4]\n"
    "try:\n"
    "    print(json.dumps(Client(url, token=token).volumes.list(image)))\n"
    "except NotFound:\n"
    "    print('[]')\n"
)


@dataclass
class Daemon:
    name: str
    host: Host
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)
    dumps_stacks: bool = False  # SIGUSR1 writes every thread's stack to its log (faulthandler)

    def stop(self, timeout: float = 60.0) -> int:
        self.terminate()
        return self.reap(timeout)

    def terminate(self) -> None:
        """SIGTERM, if it still runs (``reap`` waits for it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout: float = 60.0) -> int:
        """Wait for the exit, SIGKILL after ``timeout``; the exit status."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if self.dumps_stacks:  # where it hangs, for the log, before it is killed
                self.proc.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=2)
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def parse_proc_net_counters(text: str) -> dict[str, int]:
    """``/proc/net/snmp`` / ``netstat`` text (a ``Group: names`` line, then ``Group: values``)
    as ``{"<Group><name>": value}``."""
    found: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        group, _, keys = names.partition(":")
        if values.partition(":")[0] != group:
            raise ValueError(f"counters out of step: {names[:40]!r} then {values[:40]!r}")
        for key, value in zip(keys.split(), values.partition(":")[2].split(), strict=True):
            found[f"{group}{key}"] = int(value)
    return found


class ControlRpc:
    """XML-RPC calls to the nodes from threads inside the control host's namespace.

    ``LocalCluster.rpc`` starts a Python client process per call (≈ 0.1 s of CPU); a
    benchmark that times a burst of calls uses this instead, so that it times the nodes, not
    its own clients' start. The threads live in the control namespace until ``close()``.
    """

    def __init__(self, cluster: LocalCluster, workers: int) -> None:
        self._cluster = cluster
        self._pool = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="ctl-rpc",
            initializer=enter_in_thread,
            initargs=(cluster.hosts["ctl"].netns,),
        )

    def __call__(self, host_name: str, method: str, *args: Any, timeout_s: float = 300.0) -> Any:
        """As ``LocalCluster.rpc``: the answer as JSON gives it back (lists, not tuples)."""
        c = self._cluster
        ca = str(c.rpc_ca_file) if c.rpc_ca_file else None
        url = c.rpc_url(host_name)
        call = self._pool.submit(rpcclient.call, url, c.token, method, args, ca, timeout_s)
        return json.loads(json.dumps(call.result()))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ControlRpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalCluster:
    def __init__(
        self,
        workdir: Path,
        nodes: int,
        *,
        name: str = "vmt",
        subnet: str = "10.231.0.0/24",
        token: str | None = None,
        heartbeat_interval: int = 2,
        node_timeout: int = 10,
        executor: str = "balanced",
        chap: bool = True,
        nbd_tls: bool = True,
        tgt_control_base: int = 3300,
        lab_state_dir: Path | None = None,
        extra_conf: str = "",
        image_dirs: list[Path] | None = None,
        rpc_ca_file: Path | None = None,
        bus: bool = False,
        node_conf: dict[str, str] | None = None,
        controller: bool = False,
        controller_conf: str = "",
        volt_conf: str = "",
    ) -> None:
        self.workdir = workdir
        self.node_count = nodes
        self.token = token or secrets.token_hex(16)  # a fresh secret per cluster
        # Volt's admin token is self.token (the control host's volt_tree uses it); each
        # virtmanserver gets the node token of its own host_ip, derived from this secret.
        self.node_secret = secrets.token_hex(16)
        self.heartbeat_interval = heartbeat_interval
        self.node_timeout = node_timeout
        self.executor = executor
        self.extra_conf = extra_conf  # appended to every virtman.conf ([DEFAULT] lines)
        self.volt_conf = volt_conf  # appended to volt.conf (whole sections)
        self.node_conf = node_conf or {}  # appended to one host's virtman.conf
        # What the image server may export: by default the work directory's parent, where
        # the demo, the benchmarks and the tests put their image files.
        self.image_dirs = image_dirs or [workdir.parent]
        # Set when extra_conf gives the nodes tls_cert_file/tls_key_file: RPCs then use
        # https and trust this CA.
        self.rpc_ca_file = rpc_ca_file
        # fresh data plane credentials per cluster, the same on every node (without one
        # of them the nodes run with insecure_targets)
        self.chap = ("vmthunder", secrets.token_hex(8)) if chap else None
        self.psk_file = workdir / "nbd-psk" / psk.FILENAME if nbd_tls else None
        self.psk_identity = "vmthunder"
        # tgtd's control sockets (/var/run/tgtd/socket.N) are shared by all namespaces:
        # clusters that run at the same time need distinct bases.
        self.tgt_control_base = tgt_control_base
        # A fixed lab_state_dir lets the next run remove what a killed run left (Lab.cleanup).
        self.lab = Lab(name, subnet, state_dir=lab_state_dir or workdir / "lab")
        self.hosts: dict[str, Host] = {}
        self.daemons: dict[str, Daemon] = {}
        # With ``bus``: a private RabbitMQ on the volt host (inside its namespace), and
        # every daemon's transport_url pointing at it (docs/bus.rst).
        self.bus = bus
        self.rabbitmq: RabbitMQ | None = None
        # With ``controller``: volt-api runs the cluster controller over the compute nodes
        # (docs/cluster.rst); a guest it deploys reads its image from the image server.
        if controller and rpc_ca_file is not None:
            raise ValueError("the cluster controller calls the nodes over http only here")
        self.controller = controller
        self.controller_conf = controller_conf  # appended to volt.conf's [cluster] section

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.psk_file is not None and not self.psk_file.exists():
            self.psk_file.parent.mkdir(mode=0o700, exist_ok=True)
            psk.write_new(self.psk_file, self.psk_identity)
        for host in ["volt", "img", "ctl", *self.node_names]:
            self.hosts[host] = self.lab.add_host(host)
        if self.bus:
            self.start_rabbitmq()
        self.start_volt()
        for i, host in enumerate(["img", *self.node_names]):
            self.start_virtman(host, index=i)
        return self

    @property
    def node_names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.node_count)]

    def close(self) -> None:
        """Destroy every VM instance and image target, stop every daemon (virtman nodes
        first, so that they tear their stacks down), then remove the namespaces."""
        try:
            self.destroy_all()
        except Exception as exc:  # the namespaces go anyway, and their processes with them
            print(f"cluster: could not destroy everything cleanly: {exc}", file=sys.stderr)
        # the compute nodes all at once (each tears its own stacks down: a few seconds, most
        # of it its bus listener's stop), then the image server they read from
        nodes = [d for d in (self.daemons.pop(n, None) for n in self.node_names) if d]
        for daemon in nodes:
            daemon.terminate()
        for daemon in nodes:
            daemon.reap()
        image_server = self.daemons.pop("img", None)
        if image_server is not None:
            image_server.stop()
        volt = self.daemons.pop("volt", None)
        if volt is not None:
            volt.stop()
        if self.rabbitmq is not None:
            try:
                self.rabbitmq.stop()
            except Exception as exc:  # the namespace goes anyway, and the broker with it
                print(f"cluster: could not stop rabbitmq-server: {exc}", file=sys.stderr)
        self.lab.close()
        try:  # exports of daemons the lab's sweep ended (a node that failed half way)
            unmount_dead_fuse_exports(self.workdir)
        except BrickError as exc:
            print(f"cluster: {exc}", file=sys.stderr)

    def destroy_all(self) -> None:
        """Destroy the instances of every running node, then the image server's targets.
        A node that fails (e.g. not listening yet) does not stop the others; the errors
        are raised together at the end."""
        errors: list[Exception] = []
        for name in [*self.node_names, "img"]:
            daemon = self.daemons.get(name)
            if daemon is None or daemon.proc.poll() is not None:
                continue
            try:
                if name == "img":
                    for image in self.rpc(name, "list_image_target"):
                        self.rpc(name, "destroy_image_target", image)
                else:
                    for entry in self.rpc(name, "list"):
                        self.rpc(name, "destroy", entry.partition(":")[0])
            except Exception as exc:
                exc.add_note(f"while destroying what {name} holds")
                errors.append(exc)
        if errors:
            raise ExceptionGroup("cluster: some nodes could not be emptied", errors)

    @staticmethod
    def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        wait_until(predicate, timeout_s=timeout_s, what=what)

    def processes(self, host_name: str) -> list[int]:
        """PIDs of every process that runs inside the host's namespace now."""
        inode = netns_inode(self.hosts[host_name].netns)
        return pids_in_netns(inode) if inode is not None else []

    # -- daemons -------------------------------------------------------------------------------
    def start_rabbitmq(self) -> RabbitMQ:
        """Start (or start again) the bus's broker on the volt host."""
        if self.rabbitmq is None:
            host = self.hosts["volt"]
            self.rabbitmq = RabbitMQ(
                self.workdir / "rabbitmq",
                address=host.address,
                netns=host.netns,
                name=self.lab.name,
            )
        return self.rabbitmq.start()

    def _bus_conf(self) -> str:
        """[DEFAULT] transport_url and quick reconnects (a test restarts the broker)."""
        if self.rabbitmq is None:
            return ""
        return f"transport_url = {self.rabbitmq.transport_url}\n"

    @staticmethod
    def _bus_sections(bus: bool) -> str:
        if not bus:
            return ""
        return (
            "[oslo_messaging_rabbit]\nrabbit_retry_interval = 1\nrabbit_retry_backoff = 1\n"
            "rabbit_interval_max = 2\nkombu_reconnect_delay = 0.5\n"
        )

    def start_volt(self) -> Daemon:
        host = self.hosts["volt"]
        d = self.workdir / "volt"
        d.mkdir(exist_ok=True)
        conf = d / "volt.conf"
        conf.write_text(
            "[DEFAULT]\n"
            f"bind_host = {host.address}\nbind_port = 7447\n"
            f"default_executor = {self.executor}\nnode_timeout = {self.node_timeout}\n"
            f"pid_file = {d / 'volt-api.pid'}\n"
            + self._bus_conf()
            + self._bus_sections(self.bus)
            + f"[auth]\ntoken = {self.token}\nnode_secret = {self.node_secret}\n"
            f"[database]\nconnection = sqlite:///{d / 'volt.sqlite'}\n"
            + self._cluster_section(d)
            + self.volt_conf
        )
        log = d / "volt-api.log"
        extra: dict[str, Any] = {"log_offset": log.stat().st_size if log.exists() else 0}
        proc = host.spawn([PYTHON, "-m", "volt.cmd.api", "--config-file", str(conf)], log)
        daemon = self.daemons["volt"] = Daemon("volt", host, proc, log, extra)
        self._wait_log(daemon, "volt-api ready")
        return daemon

    def _cluster_section(self, d: Path) -> str:
        """[cluster]: the nodes file of every compute node's virtmanserver (0600: it holds
        their token), capacity asked every second."""
        if not self.controller:
            return ""
        nodes = [
            {"id": n, "url": f"http://{self.hosts[n].address}:7774/RPC2", "token": self.token}
            for n in self.node_names
        ]
        nodes_file = d / "nodes.json"
        nodes_file.touch(mode=0o600)
        nodes_file.write_text(json.dumps(nodes, indent=1) + "\n")
        return (
            f"[cluster]\nnodes_file = {nodes_file}\ncapacity_interval = 1.0\n"
            + self.controller_conf
        )

    def restart_volt(self, *, executor: str | None = None, fresh: bool = False) -> Daemon:
        """Stop volt-api and start it again (with another placement executor, and with an
        empty store if ``fresh``)."""
        self.daemons.pop("volt").stop()
        if executor is not None:
            self.executor = executor
        if fresh:
            (self.workdir / "volt" / "volt.sqlite").unlink(missing_ok=True)
        return self.start_volt()

    def node_dir(self, host: str) -> Path:
        return self.workdir / "nodes" / host

    def start_virtman(self, host_name: str, *, index: int | None = None) -> Daemon:
        host = self.hosts[host_name]
        d = self.node_dir(host_name)
        d.mkdir(parents=True, exist_ok=True)
        if index is None:
            index = ["img", *self.node_names].index(host_name)
        conf = d / "virtman.conf"
        chap = f"chap_user = {self.chap[0]}\nchap_password = {self.chap[1]}\n" if self.chap else ""
        if self.psk_file is not None:
            chap += f"nbd_psk_file = {self.psk_file}\n"
        if self.chap is None or self.psk_file is None:
            chap += "insecure_targets = true\n"
        images = ""  # where the controller's guests read their image: the image server
        if self.controller and host_name != "img":
            images = f"guest_image_servers = {self.hosts['img'].address}\n"
        conf.write_text(
            "[DEFAULT]\n"
            f"host_ip = {host.address}\nmaster_ip = {self.hosts['volt'].address}\n"
            f"master_port = 7447\nmaster_token = {node_token(self.node_secret, host.address)}\n"
            f"heartbeat_interval = {self.heartbeat_interval}\n"
            f"state_dir = {d / 'state'}\nrun_dir = {d / 'run'}\n"
            f"listen_host = {host.address}\napi_token = {self.token}\n"
            f"tgt_control_port = {self.tgt_control_base + index}\n"
            f"parent_wait_timeout = 60\n"
            f"image_dirs = {','.join(str(p) for p in self.image_dirs)}\n"
            f"log_file = {d / 'virtman.log'}\n"
            + chap
            + images
            + self._bus_conf()
            + self.extra_conf
            + self.node_conf.get(host_name, "")
            + self._bus_sections(self.bus)
        )
        log = d / "virtmanserver.out"
        extra: dict[str, Any] = {"dir": d, "log_offset": log.stat().st_size if log.exists() else 0}
        proc = host.spawn([PYTHON, "-m", "virtman.cmd.server", "--config-file", str(conf)], log)
        daemon = Daemon(host_name, host, proc, log, extra, dumps_stacks=True)
        self.daemons[host_name] = daemon
        self._wait_log(daemon, "Virtman Server Run ...")
        return daemon

    def _wait_log(self, daemon: Daemon, marker: str, timeout_s: float = 60.0) -> None:
        """Wait for ``marker`` in what the daemon logged since it started (a restarted
        daemon appends to the log of the previous run)."""
        start = daemon.extra.get("log_offset", 0)

        def ready() -> bool:
            if daemon.proc.poll() is not None:
                raise RuntimeError(
                    f"{daemon.name} exited {daemon.proc.returncode}:\n{self._logs(daemon)}"
                )
            return marker in daemon.log_text()[start:]

        wait_until(ready, timeout_s=timeout_s, what=f"{daemon.name} to start")

    def _logs(self, daemon: Daemon) -> str:
        text = daemon.log_text()
        extra = daemon.extra.get("dir")
        if extra and (extra / "virtman.log").exists():
            text += (extra / "virtman.log").read_text(errors="replace")
        return text

    # -- RPC (from the control host) -----------------------------------------------------------
    def rpc_url(self, host_name: str) -> str:
        scheme = "https" if self.rpc_ca_file else "http"
        return f"{scheme}://{self.hosts[host_name].address}:7774/RPC2"

    def rpc(self, host_name: str, method: str, *args: Any, timeout_s: float = 300.0) -> Any:
        """One XML-RPC call from a new client process on the control host."""
        url = self.rpc_url(host_name)
        argv = [PYTHON, str(RPC_CLIENT), url, self.token, method, json.dumps(args)]
        if self.rpc_ca_file:
            argv.append(str(self.rpc_ca_file))
        result = self.hosts["ctl"].run(argv, timeout_s=timeout_s)
        return json.loads(result.stdout)

    def volt_tree(self, image: str) -> list[dict[str, Any]]:
        """Volt's nodes of ``image`` (breadth first: identity, parent, depth, parents),
        asked from the control host; [] when Volt knows no such tree."""
        url = f"http://{self.hosts['volt'].address}:7447"
        result = self.hosts["ctl"].run(
            [PYTHON, "-c", VOLT_SNIPPET, url, self.token, image], timeout_s=60
        )
        return json.loads(result.stdout)

    def connection(self, image: str) -> dict[str, Any]:
        return {
            "target_portal": f"{self.hosts['img'].address}:3260",
            "target_iqn": f"iqn.2010-10.org.openstack:{image}",
            "target_lun": 1,
        }

    def tx_bytes(self, host_name: str) -> int:
        """Bytes the host has sent on its link (its eth0)."""
        return self.link_bytes(host_name)[0]

    def link_bytes(self, host_name: str) -> tuple[int, int]:
        """(sent, received) bytes of the host's link (its eth0)."""
        out = self.hosts[host_name].run(["ip", "-j", "-s", "link", "show", "eth0"]).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def tcp_counters(self, host_name: str) -> dict[str, int]:
        """The host's TCP loss counters so far (its namespace's ``/proc/net/snmp`` and
        ``netstat``): segments retransmitted, retransmission timeouts, spurious ones."""
        out = self.hosts[host_name].run(["cat", "/proc/net/snmp", "/proc/net/netstat"]).stdout
        found = parse_proc_net_counters(out)
        return {name: found.get(key, 0) for name, key in TCP_LOSS_COUNTERS.items()}

    def paths(self, host_name: str, image: str) -> list[dict[str, Any]]:
        """The node's upstream paths now, in read order (the qemu driver's record)."""
        f = self.node_dir(host_name) / "run" / "paths" / f"{image}.json"
        return json.loads(f.read_text()) if f.exists() else []

    # -- faults (bench/chaos.py) -------------------------------------------------------------
    def component_pid(self, host_name: str, component: str) -> int | None:
        """PID of one of the host's daemons: ``virtmanserver`` and ``volt-api`` from this
        cluster's records, ``qsd`` and ``tgtd`` from the node's pidfiles (only if that PID
        lives in the host's namespace and runs that program: never a reused PID)."""
        if component in ("virtmanserver", "volt-api"):
            daemon = self.daemons.get("volt" if component == "volt-api" else host_name)
            return daemon.proc.pid if daemon and daemon.proc.poll() is None else None
        run = self.node_dir(host_name) / "run"
        files = {"qsd": (run / "virtman-qsd.pid", "qemu-storage-daemon")}
        index = ["img", *self.node_names].index(host_name)
        files["tgtd"] = (run / f"tgtd-{self.tgt_control_base + index}.pid", "tgtd")
        pidfile, program = files[component]
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if pid not in self.processes(host_name):
            return None
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            return None
        return pid if Path(argv0.decode()).name == program else None

    def kill_component(self, host_name: str, component: str) -> int:
        """SIGKILL one daemon of the host (see ``component_pid``); returns its PID."""
        pid = self.component_pid(host_name, component)
        if pid is None:
            raise RuntimeError(f"{host_name} runs no {component} of this cluster")
        if component in ("virtmanserver", "volt-api"):
            self.daemons.pop("volt" if component == "volt-api" else host_name).kill9()
            return pid
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: pid not in self.processes(host_name) or _zombie(pid),
            timeout_s=30,
            what=f"{component} pid {pid} to die",
        )
        return pid

    def kill_node(self, host_name: str) -> list[int]:
        """A dead machine: SIGKILL the host's virtmanserver (first: its supervisor would
        start the others again), then its qemu-storage-daemon and tgtd, each by PID after
        the checks of ``component_pid``. Returns the PIDs killed."""
        killed = [self.kill_component(host_name, "virtmanserver")]
        for component in ("qsd", "tgtd"):
            if self.component_pid(host_name, component) is not None:
                killed.append(self.kill_component(host_name, component))
        return killed

    def set_link(self, host_name: str, up: bool) -> None:
        """Take the host's link (its eth0, inside its namespace) down or up."""
        self.hosts[host_name].run(["ip", "link", "set", "eth0", "up" if up else "down"])


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"
