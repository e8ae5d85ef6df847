"""brick.netns with real namespaces (root). Every packet stays inside the test's namespaces:
nothing here connects from the root namespace to a lab address."""

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brick.exception import BrickError, Conflict, InvalidArgument
from brick.executor import execute
from brick.netns import Host, Lab, list_netns, pids_in_netns, veth_name
from brick.wait import wait_until

PY = sys.executable
SUBNET = "10.239.0.0/24"
LAB = f"t{os.getpid() % 100000}"  # unique per test run: runs may overlap

ECHO_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
c, _ = s.accept()
while data := c.recv(65536):
    c.sendall(data)
c.close()
"""

ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(sys.argv[3].encode())
c.shutdown(socket.SHUT_WR)
got = b""
while data := c.recv(65536):
    got += data
print(got.decode(), end="")
"""

SINK = """
import json, socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
c, _ = s.accept()
start, total = time.monotonic(), 0
while data := c.recv(1 << 20):
    total += len(data)
print(json.dumps({"bytes": total, "seconds": time.monotonic() - start}), flush=True)
"""

SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
chunk, left = b"x" * (1 << 20), int(sys.argv[3])
while left > 0:
    c.sendall(chunk[:left])
    left -= len(chunk)
c.close()
"""

CRASHER = """
import os, sys
from pathlib import Path
from brick.netns import Lab
lab = Lab(sys.argv[1], sys.argv[2], state_dir=Path(sys.argv[3]))
a = lab.add_host("a")
lab.add_host("b")
proc = a.spawn(["sleep", "1000"], Path(sys.argv[3]) / "sleep.log")
print(proc.pid, flush=True)
os._exit(0)  # a crash: no close(), no finalizers
"""


# -- helpers -------------------------------------------------------------------------------
def ours(name: str) -> list[str]:
    """Namespaces of lab ``name`` (its switch and hosts) that exist now."""
    return [n for n in list_netns() if n.startswith(f"{name}-")]


def root_links() -> set[str]:
    out = execute(["ip", "-o", "link", "show"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def root_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 address (as its network) and route destination of the root namespace."""
    found = []
    for line in execute(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        fields = line.split()
        found.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    for line in execute(["ip", "-o", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        for token in line.split():
            if token == "default":
                break
            try:
                found.append(ipaddress.IPv4Network(token, strict=False))
                break
            except ValueError:
                continue  # a route type such as "local" or "broadcast"
    return found


def wait_log(proc: subprocess.Popen, log: Path, marker: str) -> None:
    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        return marker in log.read_text()

    wait_until(ready, timeout_s=10, what=f"{marker!r} in {log}")


def throughput(sender: Host, receiver: Host, tmp: Path, size: int, port: int) -> float:
    """Bytes per second from ``sender`` to ``receiver``, measured by the receiver."""
    log = tmp / f"sink{port}.log"
    sink = receiver.spawn([PY, "-c", SINK, receiver.address, str(port)], log)
    wait_log(sink, log, "ready")
    sender.run([PY, "-c", SOURCE, receiver.address, str(port), str(size)], timeout_s=60)
    assert sink.wait(timeout=30) == 0, log.read_text()
    result = json.loads(log.read_text().splitlines()[-1])
    assert result["bytes"] == size
    return result["bytes"] / result["seconds"]


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir; at the end, whatever a test left is cleaned up and counted as a failure."""
    d = tmp_path / "state"
    yield d
    left = ours(LAB)
    Lab.cleanup(LAB, d)
    assert left == [], f"test left namespaces {left}"
    assert ours(LAB) == []


@pytest.fixture
def lab(state_dir: Path) -> Iterator[Lab]:
    with Lab(LAB, SUBNET, state_dir=state_dir) as lab:
        for name in ("a", "b", "c"):
            lab.add_host(name)
        yield lab


# -- tests ---------------------------------------------------------------------------------
def test_hosts_talk_over_the_bridge(lab: Lab, tmp_path: Path) -> None:
    a, b, c = lab.hosts["a"], lab.hosts["b"], lab.hosts["c"]
    assert [a.address, b.address, c.address] == ["10.239.0.1", "10.239.0.2", "10.239.0.3"]
    assert sorted(ours(LAB)) == sorted([f"{LAB}-a", f"{LAB}-b", f"{LAB}-c", f"{LAB}-sw"])
    log = tmp_path / "echo.log"
    server = a.spawn([PY, "-c", ECHO_SERVER, a.address, "7000"], log)
    wait_log(server, log, "ready")
    payload = "hello from b " * 1000
    got = b.run([PY, "-c", ECHO_CLIENT, a.address, "7000", payload], timeout_s=20).stdout
    assert got == payload
    assert server.wait(timeout=10) == 0


def test_hosts_have_only_lo_and_eth0_and_share_the_root_mount_namespace(lab: Lab) -> None:
    b = lab.hosts["b"]
    assert b.nsenter_argv() == ["nsenter", f"--net=/var/run/netns/{LAB}-b"]
    addrs = b.run(["ip", "-o", "-4", "addr", "show"]).stdout
    assert [line.split()[1] for line in addrs.splitlines()] == ["lo", "eth0"]
    assert f"inet {b.address}/24 " in addrs
    assert b.run(["readlink", "/proc/self/ns/mnt"]).stdout.strip() == os.readlink(
        "/proc/self/ns/mnt"
    )
    assert b.run(["readlink", "/proc/self/ns/net"]).stdout.strip() != os.readlink(
        "/proc/self/ns/net"
    )


def test_root_namespace_has_no_address_route_or_link_of_the_lab(lab: Lab) -> None:
    subnet = ipaddress.IPv4Network(SUBNET)
    overlapping = [n for n in root_networks() if n.overlaps(subnet)]
    assert overlapping == []
    assert not {veth_name(LAB, i) for i in range(3)} & root_links()
    assert "br0" not in root_links()


def test_close_removes_everything_and_is_idempotent(state_dir: Path) -> None:
    links_before = root_links()
    lab = Lab(LAB, SUBNET, state_dir=state_dir)
    host = lab.add_host("a")
    lab.add_host("b")
    proc = host.spawn(["sleep", "1000"], state_dir / "sleep.log")
    assert (state_dir / f"{LAB}.json").exists()
    lab.close()
    assert ours(LAB) == []
    assert proc.poll() is not None  # ended and reaped by close()
    assert not (state_dir / f"{LAB}.json").exists()
    assert root_links() == links_before
    lab.close()
    with pytest.raises(BrickError, match="closed"):
        lab.add_host("c")


def test_cleanup_after_a_crash(state_dir: Path, tmp_path: Path) -> None:
    state_dir.mkdir()
    out = subprocess.run(
        [PY, "-c", CRASHER, LAB, SUBNET, str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    sleep_pid = int(out.strip())
    assert sorted(ours(LAB)) == sorted([f"{LAB}-a", f"{LAB}-b", f"{LAB}-sw"])
    inode = os.stat(f"/var/run/netns/{LAB}-a").st_ino
    assert pids_in_netns(inode) == [sleep_pid]
    with pytest.raises(Conflict, match="previous run"):
        Lab(LAB, SUBNET, state_dir=state_dir).add_host("a")
    assert Lab.cleanup(LAB, state_dir) is True
    assert ours(LAB) == []
    assert not (state_dir / f"{LAB}.json").exists()
    stat = Path(f"/proc/{sleep_pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] in ("Z", "X")
    assert Lab.cleanup(LAB, state_dir) is False
    with Lab(LAB, SUBNET, state_dir=state_dir) as lab:  # the name is usable again
        lab.add_host("a")


def test_an_existing_namespace_is_never_adopted(state_dir: Path) -> None:
    execute(["ip", "netns", "add", f"{LAB}-b"])
    try:
        lab = Lab(LAB, SUBNET, state_dir=state_dir)
        lab.add_host("a")
        with pytest.raises(Conflict):
            lab.add_host("b")
        lab.close()
        assert ours(LAB) == [f"{LAB}-b"]  # the foreign namespace survived close()
    finally:
        execute(["ip", "netns", "del", f"{LAB}-b"])


def test_invalid_arguments_create_nothing(state_dir: Path) -> None:
    before = list_netns()
    for name, subnet in [
        ("Bad", SUBNET),
        ("a_b", SUBNET),
        ("toolonglabname", SUBNET),
        (LAB, "8.8.8.0/24"),
        (LAB, "10.239.0.0/29"),
        (LAB, "10.239.0.1/24"),
    ]:
        with pytest.raises(InvalidArgument):
            Lab(name, subnet, state_dir=state_dir)
    lab = Lab(LAB, SUBNET, state_dir=state_dir)
    for host in ("sw", "B", "-x", "h" * 12, ""):
        with pytest.raises(InvalidArgument):
            lab.add_host(host)
    assert list_netns() == before
    assert not state_dir.exists()
    lab.close()


def test_setup_and_teardown_time_for_five_hosts(state_dir: Path) -> None:
    started = time.monotonic()
    lab = Lab(LAB, SUBNET, state_dir=state_dir)
    for i in range(5):
        lab.add_host(f"n{i}")
    built = time.monotonic()
    lab.close()
    done = time.monotonic()
    print(
        f"\nnetns lab 1 switch + 5 hosts: setup {built - started:.3f} s, "
        f"teardown {done - built:.3f} s"
    )
    assert built - started < 5
    assert done - built < 5


def test_shape_limits_throughput(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.hosts["a"], lab.hosts["b"]
    size = 24 * 1000 * 1000
    free = throughput(b, a, tmp_path, size, 7001)
    lab.shape(b, 100)
    shaped_up = throughput(b, a, tmp_path, size, 7002)
    shaped_down = throughput(a, b, tmp_path, size, 7003)
    lab.unshape(b)
    lab.unshape(b)  # idempotent
    again = throughput(b, a, tmp_path, size, 7004)
    print(
        f"\nthroughput MB/s: unshaped {free / 1e6:.1f}, tbf 100 Mbit up {shaped_up / 1e6:.1f}"
        f" down {shaped_down / 1e6:.1f}, unshaped again {again / 1e6:.1f}"
    )
    assert 8e6 <= shaped_up <= 14e6
    assert 8e6 <= shaped_down <= 14e6
    assert free > 40e6
    assert again > 40e6
    # host_egress=False: what b receives is shaped, what it sends is not, and b's own
    # device keeps the kernel's root qdisc (for virtman's uplink_priority to take)
    lab.shape(b, 100, host_egress=False)
    down_only = throughput(a, b, tmp_path, size, 7005)
    up_free = throughput(b, a, tmp_path, size, 7006)
    root = b.run(["tc", "qdisc", "show", "dev", "eth0", "root"]).stdout
    lab.unshape(b)
    assert 8e6 <= down_only <= 14e6
    assert up_free > 40e6
    assert "tbf" not in root, root
    with pytest.raises(InvalidArgument):
        lab.shape(b, 0)
