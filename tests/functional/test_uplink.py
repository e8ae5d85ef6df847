"""brick.uplink on a real link (root): a parent namespace ``p`` and two readers ``c0`` and
``c1`` on a private bridge (``brick.netns.Lab`` ``<VMT_TEST_LAB>-q``, 10.244.0.0/24, in
/run/vmt-test-labs). The classes and filters tc shows after each apply, two TCP streams
served by slot on a 50 Mbit/s uplink, adoption by a new object, and remove() giving the
device its default qdisc back. Every packet stays inside the lab's namespaces; the lab is
removed at the end (and a killed run's by the next run)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import prio_qdisc
from brick import uplink
from brick.exception import Conflict
from brick.executor import execute
from brick.netns import HOST_IFNAME, Host, Lab
from brick.tgt import TgtAdm, TgtDaemon
from brick.wait import wait_until
from tests.functional.virtmanproc import VIRTMANSERVER, VirtmanProcess
from virtman import uplinkwatch

LAB = f"{os.environ.get('VMT_TEST_LAB', 'vmt')}-q"
SUBNET = "10.244.0.0/24"
LAB_STATE = Path("/run/vmt-test-labs")
MBIT = 50
OTHER = "10.244.0.99"  # a third reader's address (no host: only its class is checked)
PRIO_QDISC = Path(prio_qdisc.__file__).resolve()

pytestmark = pytest.mark.functional
TGT_CONTROL = int(os.environ.get("VMT_TEST_TGT_BASE", "3400")) + 74  # an offset no other test uses
IQN = "iqn.2010-10.org.openstack:volume-uplink-test"


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("needs root: network namespaces and tc")
    Lab.cleanup(LAB, LAB_STATE)
    with Lab(LAB, SUBNET, state_dir=LAB_STATE) as made:
        for name in ("p", "c0", "c1"):
            made.add_host(name)
        yield made
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith(f"{LAB}-")]


def tc_show(host: Host, *what: str) -> str:
    return execute(["tc", "-n", host.netns, *what, "dev", HOST_IFNAME]).stdout


CLASS_LINE = re.compile(
    r"^class htb 7674:(\w+) (?:root|parent 7674:1)(?: leaf \w+:)?(?: prio (\d))? "
    r"rate (\w+) ceil (\w+)",
    re.MULTILINE,
)


def classes(host: Host) -> dict[str, tuple[str | None, str, str]]:
    """classid minor -> (prio, rate, ceil) from ``tc -s class show``."""
    text = tc_show(host, "-s", "class", "show")
    return {m[0]: (m[1] or None, m[2], m[3]) for m in CLASS_LINE.findall(text)}


def expected_classes(n: int) -> dict[str, tuple[str | None, str, str]]:
    want = {"1": (None, "50Mbit", "50Mbit"), "2": ("0", "1Mbit", "50Mbit")}
    for slot in range(n):
        want[f"{0x10 + slot:x}"] = (str(1 + slot), "1Mbit", "50Mbit")
    return want


def filters(host: Host) -> list[tuple[str, str]]:
    """(flowid, address) of every u32 filter of our qdisc, in pref order."""
    text = tc_show(host, "filter", "show")  # every filter of the device: ours only
    shown = uplink.parse_filters(text)
    return [(f.flowid, str(f.address)) for f in sorted(shown, key=lambda f: f.pref)]


def test_apply_2_3_2_readers_adopt_and_remove(lab: Lab) -> None:
    p, c0, c1 = (lab.hosts[n] for n in ("p", "c0", "c1"))
    assert uplink.root_qdisc(tc_show(p, "qdisc", "show")) == ("noqueue", 0)
    up = uplink.Uplink(HOST_IFNAME, MBIT, netns=p.netns)
    assert up.apply([c0.address, c1.address]) == 7
    assert uplink.root_qdisc(tc_show(p, "qdisc", "show")) == ("htb", uplink.MAJOR)
    assert classes(p) == expected_classes(2)
    assert filters(p) == [("7674:10", c0.address), ("7674:11", c1.address)]
    assert up.apply([c0.address, c1.address]) == 0

    assert up.apply([c0.address, c1.address, OTHER]) == 2
    assert classes(p) == expected_classes(3)
    assert filters(p) == [("7674:10", c0.address), ("7674:11", c1.address), ("7674:12", OTHER)]

    # c0 leaves: c1 takes slot 0, OTHER slot 1, slot 2's class goes
    assert up.apply([c1.address, OTHER]) > 0
    assert classes(p) == expected_classes(2)
    assert sorted(filters(p)) == [("7674:10", c1.address), ("7674:11", OTHER)]

    # a new object (a restarted virtman) adopts it as it is: the same readers run nothing
    again = uplink.Uplink(HOST_IFNAME, MBIT, netns=p.netns)
    assert again.adopt()
    assert again.readers == [ipaddress.ip_address(c1.address), ipaddress.ip_address(OTHER)]
    assert again.apply([c1.address, OTHER]) == 0

    assert again.remove()
    assert uplink.root_qdisc(tc_show(p, "qdisc", "show")) == ("noqueue", 0)
    assert not again.remove()


def test_someone_elses_root_qdisc_is_never_touched(lab: Lab) -> None:
    p = lab.hosts["p"]
    lab.shape(p, 100)  # a tbf of the lab's: not ours
    before = tc_show(p, "qdisc", "show")
    up = uplink.Uplink(HOST_IFNAME, MBIT, netns=p.netns)
    with pytest.raises(Conflict):
        up.apply([lab.hosts["c0"].address])
    assert not up.adopt() and not up.remove()
    assert tc_show(p, "qdisc", "show") == before


def streams(lab: Lab, seconds: dict[str, float], workdir: Path) -> dict[str, dict[int, int]]:
    """One TCP stream from p to each named child for its seconds (bench/prio_qdisc.py's
    two ends); per child, the bytes it received per 100 ms bucket."""
    me = [sys.executable, str(PRIO_QDISC)]
    receivers, outs = [], {}
    longest = max(seconds.values())
    for name in seconds:
        child = lab.hosts[name]
        ready, out = workdir / f"{name}.ready", workdir / f"{name}.json"
        for path in (ready, out):
            path.unlink(missing_ok=True)
        outs[name] = out
        argv = [*me, "--role", "recv", "--bind", child.address, "--out", str(out),
                "--ready", str(ready), "--seconds", str(longest)]  # fmt: skip
        receivers.append(child.spawn(argv, workdir / f"{name}-recv.log"))
        wait_until(ready.exists, timeout_s=10.0, what=f"receiver in {name} listening")
    senders = []
    for name, secs in seconds.items():
        argv = [*me, "--role", "send", "--to", lab.hosts[name].address, "--seconds", str(secs)]
        senders.append(lab.hosts["p"].spawn(argv, workdir / f"{name}-send.log"))
    for proc in senders + receivers:
        assert proc.wait(timeout=longest + 30) == 0, f"a stream failed: logs in {workdir}"
    return {
        name: {int(k): v for k, v in json.loads(out.read_text()).items()}
        for name, out in outs.items()
    }


def window(buckets: dict[int, int]) -> tuple[float, float]:
    return min(buckets) * prio_qdisc.BUCKET_S, (max(buckets) + 1) * prio_qdisc.BUCKET_S


def test_readers_are_served_by_slot_on_a_shaped_uplink(lab: Lab, tmp_path: Path) -> None:
    """50 Mbit/s: c0 (slot 0) sends 4 s, c1 (slot 1) 6 s. While both send c0 gets >= 80 %;
    once c0 stops, c1 has the link. Then the order reversed: c1 first."""
    p, c0, c1 = (lab.hosts[n] for n in ("p", "c0", "c1"))
    up = uplink.Uplink(HOST_IFNAME, MBIT, netns=p.netns)
    try:
        up.apply([c0.address, c1.address])
        got = streams(lab, {"c0": 4.0, "c1": 6.0}, tmp_path)
        (c0_from, c0_to), (c1_from, c1_to) = window(got["c0"]), window(got["c1"])
        both = (max(c0_from, c1_from) + 0.5, c0_to - 0.2)
        high = prio_qdisc.rate_mbit(got["c0"], *both)
        low = prio_qdisc.rate_mbit(got["c1"], *both)
        alone = prio_qdisc.rate_mbit(got["c1"], c0_to + 0.3, c1_to - 0.2)
        print(f"uplink by slot, {MBIT} Mbit/s: c0 {high:.1f} c1 {low:.1f}, c1 alone {alone:.1f}")
        assert high / (high + low) >= 0.8, (high, low)
        assert alone >= 0.8 * MBIT, alone
        sent = {m: int(b) for m, b in re.findall(
            r"^class htb 7674:(\w+) .*\n\s*Sent (\d+) bytes", tc_show(p, "-s", "class", "show"),
            re.MULTILINE)}  # fmt: skip
        assert sent["10"] > sent["11"] > 0, sent

        # reversed: c1 is now slot 0
        assert up.apply([c1.address, c0.address]) == 4
        got = streams(lab, {"c0": 3.0, "c1": 3.0}, tmp_path)
        (c0_from, c0_to), (c1_from, c1_to) = window(got["c0"]), window(got["c1"])
        both = (max(c0_from, c1_from) + 0.5, min(c0_to, c1_to) - 0.2)
        high = prio_qdisc.rate_mbit(got["c1"], *both)
        low = prio_qdisc.rate_mbit(got["c0"], *both)
        print(f"reversed: c1 {high:.1f} c0 {low:.1f}")
        assert high / (high + low) >= 0.8, (high, low)
    finally:
        up.remove()
    assert uplink.root_qdisc(tc_show(p, "qdisc", "show")) == ("noqueue", 0)


def hold(host: Host, url: str) -> subprocess.Popen[bytes]:
    """An initiator in ``host`` that stays logged in: qemu-io reading commands from a pipe
    we keep open (closing it makes qemu-io quit)."""
    argv = [*host.nsenter_argv(), "qemu-io", "-f", "raw", "-r", url]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


def release(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()  # the PID we started
        proc.wait(timeout=15)


def test_the_watch_orders_a_real_tgtds_initiators_by_arrival(lab: Lab, tmp_path: Path) -> None:
    """A tgtd in p exports one target; c1 logs in, then c0: c1 gets slot 0. c1 logs out:
    c0 moves up; c1 comes back: it goes last. stop() removes the qdisc."""
    p, c0, c1 = (lab.hosts[n] for n in ("p", "c0", "c1"))
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(1 << 20))
    daemon = TgtDaemon(TGT_CONTROL, [f"{p.address}:3260"], run_dir=tmp_path / "tgt",
                       netns=p.netns)  # fmt: skip
    daemon.start()
    holders: list[subprocess.Popen[bytes]] = []
    watch = None
    try:
        adm = TgtAdm(TGT_CONTROL)
        adm.create_target(IQN, image)
        link = uplink.Uplink(HOST_IFNAME, MBIT, netns=p.netns)
        watch = uplinkwatch.UplinkWatch(
            link, lambda: uplinkwatch.node_readers(adm, (), [p.address]), interval_s=0.2
        ).start()
        url = f"iscsi://{p.address}:3260/{IQN}/1"

        def readers() -> list[str]:
            return [str(a) for a in link.readers]

        first = hold(c1, url)
        holders.append(first)
        wait_until(lambda: readers() == [c1.address], timeout_s=15, what="c1 as reader")
        holders.append(hold(c0, url))
        wait_until(lambda: readers() == [c1.address, c0.address], timeout_s=15, what="c0 after")
        assert filters(p) == [("7674:10", c1.address), ("7674:11", c0.address)]
        release(first)
        wait_until(lambda: readers() == [c0.address], timeout_s=15, what="c1 gone")
        holders.append(hold(c1, url))
        wait_until(lambda: readers() == [c0.address, c1.address], timeout_s=15, what="c1 back")
        assert sorted(filters(p)) == [("7674:10", c0.address), ("7674:11", c1.address)]
        assert classes(p) == expected_classes(2)
    finally:
        for proc in holders:
            release(proc)
        if watch is not None:
            watch.stop()
        daemon.stop()
    assert uplink.root_qdisc(tc_show(p, "qdisc", "show")) == ("noqueue", 0)


class NsVirtman(VirtmanProcess):
    """A real virtmanserver (qemu driver, no Volt) inside ``host``'s namespace, host_ip its
    address. Never addressed from here: it is stopped by SIGTERM to its PID."""

    def __init__(self, host: Host, workdir: Path, **options: object) -> None:
        self.host = host
        super().__init__(workdir, host_ip=host.address, **options)

    def spawn(self) -> subprocess.Popen[bytes]:
        argv = [*self.host.nsenter_argv(), *VIRTMANSERVER, "--config-file", str(self.config_path)]
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        return self.proc

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the PID we started
            self.proc.wait()
            self.reap()
            raise


def test_virtmanserver_serves_its_readers_by_priority_and_removes_the_qdisc(
    lab: Lab, tmp_path: Path
) -> None:
    """uplink_priority = true on a real virtmanserver in p: its uplink gets our qdisc at
    start, an initiator of a target of its tgtd (qemu-io in c0) gets slot 0, and SIGTERM
    leaves the device its default qdisc."""
    p, c0 = lab.hosts["p"], lab.hosts["c0"]
    node = NsVirtman(p, tmp_path / "node", uplink_priority="true", uplink_mbit=MBIT)
    node.start()
    holder = None
    try:
        assert "uplink priority: eth0 at 50 Mbit/s, floor 1000 kbit/s" in node.logs()
        assert uplink.root_qdisc(tc_show(p, "qdisc", "show")) == ("htb", uplink.MAJOR)
        assert classes(p) == expected_classes(0)
        image = tmp_path / "image.raw"
        image.write_bytes(os.urandom(1 << 20))
        adm = TgtAdm(node.tgt_control_port)
        adm.create_target(IQN, image)
        iscsi_port = int(re.search(r"^iscsi_port = (\d+)$", node.config_path.read_text(),
                                   re.MULTILINE).group(1))  # type: ignore[union-attr]  # fmt: skip
        holder = hold(c0, f"iscsi://{p.address}:{iscsi_port}/{IQN}/1")
        wait_until(lambda: filters(p) == [("7674:10", c0.address)], timeout_s=15,
                   what="c0's filter")  # fmt: skip
        assert classes(p) == expected_classes(1)
        release(holder)
        adm.delete_target(IQN)
        wait_until(lambda: filters(p) == [], timeout_s=15, what="c0's filter removed")
    finally:
        if holder is not None:
            release(holder)
        assert node.terminate() == 0, node.logs()[-4000:]
    assert uplink.root_qdisc(tc_show(p, "qdisc", "show")) == ("noqueue", 0)
