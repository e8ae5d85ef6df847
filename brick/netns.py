"""A private L2 network of "hosts" on this machine: one network namespace per host.

``Lab(name, subnet, state_dir=...)`` is a switch namespace ``<name>-sw`` holding bridge ``br0``;
``lab.add_host("n1")`` makes namespace ``<name>-n1`` joined to the bridge by a veth pair (switch
end ``v<hash4><index>``, host end ``eth0`` carrying the next address of the subnet). Processes
are started in a host with ``nsenter --net=`` (``Host.run``, ``Host.spawn``): they join only the
network namespace and share the root mount namespace, so a FUSE mount made by one is visible
to all (``ip netns exec`` would give each a private mount namespace).

Safety rules this module keeps:

- Nothing is ever created in the root namespace: the veth is created inside the switch
  namespace with its peer moved straight into the host namespace, and no address or route of
  the subnet is added to the root namespace. Never address a host from the root namespace: it
  has no route to the subnet, so the packets would leave by its default gateway.
- Every namespace and veth is recorded in ``state_dir/<name>.json`` *before* it is created, so
  ``Lab.cleanup(name, state_dir)`` can remove what a crashed run left. Processes are ended only
  if they live in one of the recorded namespaces (compared by namespace inode), by PID.
- An existing namespace is never adopted: a name clash raises ``Conflict``.

Measured here (iproute2 6.1, 1 switch + 5 hosts, ``ip`` via execute): setup 0.08-0.13 s,
teardown 0.15-0.25 s (each veth delete waits ~20 ms for the kernel's RCU grace period).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brick import values
from brick.closing import Closing
from brick.exception import BrickError, CommandFailed, Conflict, InvalidArgument, Timeout
from brick.executor import Result, execute
from brick.proc import describe
from brick.wait import wait_until

LOG = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
BRIDGE = "br0"
HOST_IFNAME = "eth0"
SWITCH_SUFFIX = "sw"
MIN_PREFIXLEN = 28  # at most /28: 14 host addresses
IFNAMSIZ = 15  # Linux interface names are at most 15 characters
_NAME = re.compile(r"[a-z][a-z0-9-]{0,10}")
_PRIVATE = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_KILL_TIMEOUT_S = 5.0
_STATE_VERSION = 1


# -- names, subnets, addresses (pure) --------------------------------------------------------
def validate_lab_name(value: object) -> str:
    """A lab name: ``[a-z][a-z0-9-]{0,10}``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidArgument("lab name", value, "must match [a-z][a-z0-9-]{0,10}")
    return value


def validate_host_name(value: object) -> str:
    """A host name: ``[a-z][a-z0-9-]{0,10}``, and not ``sw`` (the switch's namespace)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidArgument("host name", value, "must match [a-z][a-z0-9-]{0,10}")
    if value == SWITCH_SUFFIX:
        raise InvalidArgument("host name", value, "is reserved for the switch namespace")
    return value


def validate_subnet(value: object) -> ipaddress.IPv4Network:
    """An IPv4 network (host bits zero) inside RFC 1918 space, /28 or larger."""
    if not isinstance(value, str):
        raise InvalidArgument("subnet", value, "must be a string like 10.231.0.0/24")
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise InvalidArgument("subnet", value, f"is not an IPv4 network: {exc}") from None
    if "/" not in value:
        raise InvalidArgument("subnet", value, "must give a prefix length, e.g. /24")
    if not any(net.subnet_of(p) for p in _PRIVATE):
        raise InvalidArgument("subnet", value, "must be private (RFC 1918)")
    if net.prefixlen > MIN_PREFIXLEN:
        raise InvalidArgument("subnet", value, f"must be /{MIN_PREFIXLEN} or larger")
    return net


def switch_netns(lab: str) -> str:
    """The switch namespace of lab ``lab``."""
    return f"{lab}-{SWITCH_SUFFIX}"


def host_netns(lab: str, host: str) -> str:
    """The namespace of host ``host`` in lab ``lab``."""
    return f"{lab}-{host}"


def veth_name(lab: str, index: int) -> str:
    """The switch end of host ``index``'s veth: ``v`` + 4 hex digits of the lab name + index."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidArgument("host index", index, "must be an integer >= 0")
    name = f"v{hashlib.sha256(lab.encode()).hexdigest()[:4]}{index}"
    if len(name) > IFNAMSIZ:
        raise InvalidArgument("host index", index, "gives an interface name over 15 chars")
    return name


def host_address(subnet: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Address:
    """Address of host ``index`` (0-based): the subnet's ``index + 1``-th usable address."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidArgument("host index", index, "must be an integer >= 0")
    if index >= subnet.num_addresses - 2:
        raise InvalidArgument("host index", index, f"{subnet} has no address left for it")
    return subnet.network_address + 1 + index


def nsenter_argv(netns: str) -> list[str]:
    """The argv prefix that runs a command in ``netns``'s network namespace only."""
    return ["nsenter", f"--net={NETNS_DIR / netns}"]


CLONE_NEWNET = 0x40000000  # setns(2): the fd is a network namespace


def enter_in_thread(netns: str) -> None:
    """Move the calling thread (only it) into ``netns``'s network namespace, for good.

    Sockets the thread opens afterwards belong to that namespace. For dedicated worker
    threads (a pool's initializer): the thread never comes back to the namespace it was in.
    """
    path = NETNS_DIR / netns
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise BrickError(f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


# -- processes inside a namespace ------------------------------------------------------------
def netns_inode(netns: str) -> int | None:
    """The inode of network namespace ``netns``, or None if there is no such namespace."""
    try:
        return os.stat(NETNS_DIR / netns).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(inode: int, proc: Path = Path("/proc")) -> list[int]:
    """PIDs whose network namespace has inode ``inode`` (zombies and vanished PIDs skipped)."""
    wanted = f"net:[{inode}]"
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "ns" / "net") == wanted:
                found.append(int(entry.name))
        except OSError:  # gone, a zombie, or a kernel thread
            continue
    return found


def _signal(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_netns_processes(netns: str, timeout_s: float = _KILL_TIMEOUT_S) -> list[int]:
    """SIGTERM, then SIGKILL, every process living in namespace ``netns``; returns their PIDs.

    Only PIDs whose ``/proc/<pid>/ns/net`` is this namespace are signalled.
    """
    inode = netns_inode(netns)
    if inode is None:
        return []
    victims = pids_in_netns(inode)
    if not victims:
        return []
    LOG.info("netns %s: stopping PIDs %s", netns, victims)
    _signal(victims, signal.SIGTERM)
    try:
        wait_until(
            lambda: not pids_in_netns(inode),
            timeout_s=timeout_s,
            what=f"processes in netns {netns} to exit on SIGTERM",
        )
    except Timeout:
        left = pids_in_netns(inode)
        LOG.warning(
            "netns %s: SIGKILL to PIDs %s (pid, command, state, wait channel: %s)",
            netns, left, "; ".join(describe(pid) for pid in left),
        )  # fmt: skip
        _signal(left, signal.SIGKILL)
        wait_until(
            lambda: not pids_in_netns(inode),
            timeout_s=timeout_s,
            what=f"processes in netns {netns} to exit on SIGKILL",
        )
    return victims


# -- namespaces, bridges and taps (shared with guestkit) -----------------------------------
def add_netns(netns: str, *, lo_up: bool = False) -> None:
    """``ip netns add``; ``Conflict`` if it exists (someone else's: never ours to remove)."""
    if netns_inode(values.netns(netns)) is not None:
        raise Conflict("netns", netns, "already exists (another lab, or a leftover)")
    try:
        execute(["ip", "netns", "add", netns])
    except CommandFailed as exc:
        if "File exists" in exc.stderr:  # created meanwhile by someone else
            raise Conflict("netns", netns, "already exists") from exc
        raise
    if lo_up:
        execute(["ip", "-n", netns, "link", "set", "lo", "up"])


def delete_netns(netns: str) -> None:
    execute(["ip", "netns", "del", values.netns(netns)])


def add_bridge(netns: str, bridge: str) -> None:
    """A bridge, up, inside ``netns``."""
    execute(["ip", "-n", netns, "link", "add", bridge, "type", "bridge"])
    execute(["ip", "-n", netns, "link", "set", bridge, "up"])


def add_tap(netns: str, tap: str, bridge: str) -> None:
    """A tap device inside ``netns``, up, on ``bridge``."""
    execute(["ip", "-n", netns, "tuntap", "add", "dev", tap, "mode", "tap"])
    execute(["ip", "-n", netns, "link", "set", tap, "master", bridge, "up"])


def delete_link(netns: str | None, link: str) -> None:
    """``ip link del`` in ``netns`` (None: the root namespace); a missing link is no error."""
    ip = ["ip"] if netns is None else ["ip", "-n", netns]
    execute([*ip, "link", "del", link], check_exit_code=(0, 1))


def root_links() -> set[str]:
    """The names of the links of the root network namespace."""
    out = execute(["ip", "-o", "link", "show"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


# -- objects -------------------------------------------------------------------------------
@dataclass(eq=False)
class Host:
    """One namespace on the lab's bridge. ``address`` is the IPv4 address of its ``eth0``."""

    name: str
    netns: str
    address: str
    prefixlen: int
    veth: str  # the switch end of its link
    index: int
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def nsenter_argv(self) -> list[str]:
        """``["nsenter", "--net=/var/run/netns/<ns>"]``: joins the network namespace only."""
        return nsenter_argv(self.netns)

    def run(self, argv: Sequence[str], **kw: Any) -> Result:
        """Run ``argv`` inside the host (``brick.executor.execute`` keywords apply)."""
        return execute([*self.nsenter_argv(), *argv], **kw)

    def spawn(
        self,
        argv: Sequence[str],
        log_path: Path | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the host, stdout+stderr appended to ``log_path``, in its own session.

        The returned process is the command itself (nsenter execs it). ``Lab.close`` ends it.
        """
        if isinstance(argv, str) or not argv:
            raise TypeError(f"argv must be a non-empty list of str, got {argv!r}")
        full = [*self.nsenter_argv(), *argv]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        LOG.debug("spawned %s in %s: pid %d", list(argv), self.netns, proc.pid)
        self._children.append(proc)
        return proc


class Lab(Closing):
    """A private L2 network of hosts; see the module docstring.

    The constructor only validates. The switch is created by the first ``add_host``; ``close``
    (or leaving the ``with`` block) removes everything and is idempotent.
    """

    def __init__(self, name: str, subnet: str = "10.231.0.0/24", *, state_dir: Path | str) -> None:
        self.name = validate_lab_name(name)
        self.subnet = validate_subnet(subnet)
        self.state_dir = Path(state_dir)
        self.switch_netns = switch_netns(name)
        self.hosts: dict[str, Host] = {}
        self._objects: list[dict[str, str]] = []
        self._switch_ready = False
        self._closed = False

    # -- state file ------------------------------------------------------------------------
    @staticmethod
    def state_path(name: str, state_dir: Path | str) -> Path:
        return Path(state_dir) / f"{validate_lab_name(name)}.json"

    @property
    def _state_file(self) -> Path:
        return self.state_path(self.name, self.state_dir)

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".json.tmp")
        state = {
            "version": _STATE_VERSION,
            "name": self.name,
            "subnet": str(self.subnet),
            "objects": self._objects,
        }
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self._state_file)

    def _record(self, obj: dict[str, str]) -> None:
        self._objects.append(obj)
        self._save()

    def _forget(self, obj: dict[str, str]) -> None:
        self._objects.remove(obj)
        self._save()

    # -- creation --------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if not self._objects and self._state_file.exists():
            raise Conflict(
                "lab", self.name, f"{self._state_file} exists: a previous run; Lab.cleanup() it"
            )
        out = execute(["ip", "-o", "-4", "addr", "show"]).stdout
        for line in out.splitlines():
            fields = line.split()
            if "inet" in fields:
                iface = ipaddress.IPv4Interface(fields[fields.index("inet") + 1])
                if iface.network.overlaps(self.subnet):
                    raise Conflict(
                        "lab", self.name, f"the root namespace has {iface} on {fields[1]}"
                    )

    def _add_netns(self, netns: str) -> None:
        if netns_inode(netns) is not None:
            raise Conflict("netns", netns, "already exists (another lab, or a leftover)")
        obj = {"kind": "netns", "name": netns}
        self._record(obj)
        try:
            add_netns(netns)
        except Conflict:  # someone else's: never remove it later
            self._forget(obj)
            raise

    def _ensure_switch(self) -> None:
        if self._switch_ready:
            return
        self._check_usable()
        self._add_netns(self.switch_netns)
        add_bridge(self.switch_netns, BRIDGE)
        self._switch_ready = True
        LOG.info("lab %s: switch %s ready (%s)", self.name, self.switch_netns, self.subnet)

    def add_host(self, host_name: str) -> Host:
        """Create namespace ``<lab>-<host_name>`` on the bridge, with the next address.

        Raises ``Conflict`` if the name is taken (in this lab, by an existing namespace, or by
        a previous run's state file). After any other failure, ``close()`` the lab.
        """
        host_name = validate_host_name(host_name)
        if self._closed:
            raise BrickError(f"lab {self.name!r} is closed")
        if host_name in self.hosts:
            raise Conflict("host", host_name, "already in this lab")
        index = len(self.hosts)
        address = host_address(self.subnet, index)
        veth = veth_name(self.name, index)
        netns = host_netns(self.name, host_name)
        self._ensure_switch()
        self._add_netns(netns)
        self._record({"kind": "veth", "name": veth, "netns": self.switch_netns, "peer": netns})
        sw = ["ip", "-n", self.switch_netns]
        execute(
            [*sw, "link", "add", veth, "type", "veth", "peer", "name", HOST_IFNAME, "netns", netns]
        )
        execute([*sw, "link", "set", veth, "master", BRIDGE, "up"])
        batch = (
            f"addr add {address}/{self.subnet.prefixlen} dev {HOST_IFNAME}\n"
            f"link set {HOST_IFNAME} up\n"
            "link set lo up\n"
        )
        execute(["ip", "-n", netns, "-batch", "-"], stdin=batch)
        host = Host(host_name, netns, str(address), self.subnet.prefixlen, veth, index)
        self.hosts[host_name] = host
        LOG.info("lab %s: host %s at %s (netns %s)", self.name, host_name, address, netns)
        return host

    # -- shaping ---------------------------------------------------------------------------
    def shape(
        self,
        host: Host,
        rate_mbit: float,
        burst_kb: int = 512,
        latency_ms: int = 50,
        *,
        host_egress: bool = True,
    ) -> None:
        """Limit the host's link to ``rate_mbit`` each way: a tbf qdisc on both veth ends.

        ``host_egress=False`` shapes only what the host receives and leaves its own device's
        root qdisc alone, for a host that shapes what it sends itself (virtman's
        ``uplink_priority`` with ``uplink_mbit``)."""
        if isinstance(rate_mbit, bool) or not isinstance(rate_mbit, int | float) or rate_mbit <= 0:
            raise InvalidArgument("rate_mbit", rate_mbit, "must be a number > 0")
        for value, what in ((burst_kb, "burst_kb"), (latency_ms, "latency_ms")):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(what, value, "must be an integer > 0")
        tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", f"{burst_kb}kb"]
        tbf += ["latency", f"{latency_ms}ms"]
        ends = self._ends(host) if host_egress else self._ends(host)[1:]
        for netns, dev in ends:
            execute(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", *tbf])
        LOG.info(
            "lab %s: host %s shaped to %s Mbit/s%s",
            self.name,
            host.name,
            rate_mbit,
            "" if host_egress else " (what it receives)",
        )

    def unshape(self, host: Host) -> None:
        """Remove what ``shape`` put on the host's link (no error if not shaped)."""
        for netns, dev in self._ends(host):
            execute(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], check_exit_code=(0, 2))

    def _ends(self, host: Host) -> list[tuple[str, str]]:
        if self.hosts.get(host.name) is not host:
            raise InvalidArgument("host", host.name, f"is not a host of lab {self.name!r}")
        return [(host.netns, HOST_IFNAME), (self.switch_netns, host.veth)]

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """End every process in the lab's namespaces, remove them and the state file.

        Idempotent. If some object cannot be removed an ``ExceptionGroup`` is raised and the
        state file stays, so ``close`` or ``Lab.cleanup`` can be tried again.
        """
        if self._closed:
            return
        # Our own children first, by their Popen: one spawned a moment ago may still be
        # nsenter in the root namespace, invisible to the per-namespace sweep below.
        for host in self.hosts.values():
            for child in host._children:
                _end_child(child)
        if self._objects:
            _teardown(self.name, self._objects)
        self._objects = []
        self._switch_ready = False
        self._closed = True
        with contextlib.suppress(FileNotFoundError):
            self._state_file.unlink()
        LOG.info("lab %s: closed", self.name)

    @classmethod
    def cleanup(cls, name: str, state_dir: Path | str) -> bool:
        """Remove what a previous run of lab ``name`` left; returns whether there was a state file.

        Reads ``state_dir/<name>.json``: ends the processes inside the recorded namespaces
        (SIGTERM, then SIGKILL), removes the namespaces and veths, then deletes the file.
        """
        path = cls.state_path(name, state_dir)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return False
        except json.JSONDecodeError as exc:
            raise BrickError(f"lab state file {path} is unreadable: {exc}") from exc
        if state.get("name") != name or not isinstance(state.get("objects"), list):
            raise BrickError(f"lab state file {path} is not lab {name!r}'s")
        _teardown(name, state["objects"])
        path.unlink()
        LOG.info("lab %s: cleaned up after a previous run", name)
        return True


def _end_child(child: subprocess.Popen[bytes], timeout_s: float = _KILL_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL, a process we spawned; reaps it (no PID reuse can be hit)."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        LOG.warning("pid %d ignored SIGTERM for %.0f s: SIGKILL", child.pid, timeout_s)
        child.kill()
        child.wait(timeout=timeout_s)


def _teardown(lab: str, objects: Sequence[Mapping[str, str]]) -> None:
    """Kill processes, delete veths and namespaces recorded in ``objects`` (best effort)."""
    errors: list[Exception] = []
    namespaces = [o["name"] for o in objects if o.get("kind") == "netns"]
    veths = [o for o in objects if o.get("kind") == "veth"]
    for netns in namespaces:
        try:
            kill_netns_processes(netns)
        except BrickError as exc:
            errors.append(exc)
    # A veth lives inside our namespaces and dies with them; delete it explicitly anyway, and
    # if one ever ended up in the root namespace (it should not), remove it there too.
    root = root_links() if veths else set()
    for veth in veths:
        where = [veth["netns"]] if netns_inode(veth["netns"]) is not None else []
        where += ["root"] if veth["name"] in root else []
        for ns in where:
            try:
                delete_link(None if ns == "root" else ns, veth["name"])
            except BrickError as exc:
                errors.append(exc)
    for netns in reversed(namespaces):
        if netns_inode(netns) is None:
            continue
        try:
            delete_netns(netns)
        except BrickError as exc:
            errors.append(exc)
    if errors:
        raise ExceptionGroup(f"lab {lab}: teardown left objects behind", errors)


def list_netns() -> list[str]:
    """Names of the namespaces under ``/var/run/netns``."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []
