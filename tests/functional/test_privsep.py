"""Privilege separation on, as it is by default: a real virtmanserver (qemu driver) on
127.0.0.0/8 with no ``privsep`` line in its configuration creates a VM disk from a real image
target and destroys it, and every root-only command and root daemon of that request went
through its privsep daemon: another process, virtmanserver's child, holding exactly the
capabilities of ``brick.privileged.CAPABILITIES``.

Image server: a tgtd started here (CHAP), on 127.0.0.1; the node on 127.0.0.3; a real
volt-api. ``VMT_TEST_TGT_BASE`` + 85 is the image server's tgtd control port.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import brick.privileged
import brick.privileged.process as process
import brick.privileged.sysfs
from brick import proc
from brick.exception import NotPermitted
from brick.executor import execute
from brick.tgt import Chap, TgtDaemon
from tests.functional.clusterfixtures import TGT_BASE, disk_matches, write_image
from tests.functional.virtmanproc import VirtmanProcess
from tests.functional.voltproc import VoltProcess, free_port

pytestmark = pytest.mark.functional

IQN = "iqn.2010-10.org.openstack:volume-image1"
STARTED = re.compile(r"virtmanserver: privsep daemon \{'pid': (\d+), 'uid': 0, 'capabilities'")
# bit numbers of linux/capability.h
CAP_BITS = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_ADMIN": 21,
}


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def tgtd_of(control_port: int) -> int:
    """The PID of the tgtd with ``-C control_port``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = proc.cmdline(int(entry.name))
            if argv and Path(argv[0]).name == "tgtd" and str(control_port) in argv:
                return int(entry.name)
    raise AssertionError(f"no tgtd -C {control_port}")


def test_privsep_is_on_by_default_and_carries_every_root_call(
    volt: VoltProcess, tmp_path: Path
) -> None:
    image = tmp_path / "image1.raw"
    write_image(image, 4)
    node = VirtmanProcess(
        tmp_path / "node",
        host_ip="127.0.0.3",
        master_port=volt.port,
        master_token=volt.token,
        heartbeat_interval=1,
        debug=True,  # the privsep daemon's DEBUG lines name each command it ran
    )
    assert not re.search(r"^privsep\s*=", node.config_path.read_text(), re.M)  # the default
    server = TgtDaemon(TGT_BASE + 85, [f"127.0.0.1:{free_port()}"], run_dir=tmp_path / "tgt")
    server.start()
    try:
        server.adm.create_target(IQN, image, chap=Chap("vmthunder", "test-chap-secret"))
        node.start()
        found = STARTED.search(node.logs())
        assert found, node.logs()
        daemon = int(found.group(1))
        assert daemon != node.pid
        assert status(daemon)["PPid"] == str(node.pid)  # forked by virtmanserver (root)
        kept = int(status(daemon)["CapEff"], 16)
        assert kept == sum(1 << bit for bit in CAP_BITS.values())
        assert set(CAP_BITS) == set(brick.privileged.describe())
        # the node's tgtd was started by the privsep daemon, not by virtmanserver
        assert status(tgtd_of(node.tgt_control_port))["PPid"] == str(daemon)

        connection = {"target_portal": server.portals[0], "target_iqn": IQN, "target_lun": 1}
        client = node.client(timeout=120)
        answer = client.create("vm1", "image1", connection)
        disk = node.state_dir / "instances" / "vm1.qcow2"
        assert answer == f"0:{disk}", (answer, node.logs())
        assert disk_matches(str(disk), image)  # the bytes read back through the whole stack
        assert client.destroy("vm1") == "0:"
        assert not disk.exists()
        assert client.list() == []

        log = node.logs()
        ran = re.findall(rf"privileged (\S+) \(pid {daemon}\)", log)
        # the root-only work of start, create and destroy: the node's storage daemon, its
        # tgtd and the relay target (the qemu driver reads the image with QEMU's own iSCSI
        # initiator: no iscsiadm); none of it outside the daemon
        assert {"tgtadm", "qemu-storage-daemon", "tgtd"} <= set(ran), log
        assert not re.search(rf"privileged \S+ \(pid (?!{daemon}\))", log)
        for line in log.splitlines():
            if "ran ['" in line and "rc " in line:  # the executor's line for every command
                argv0 = line.split("ran ['", 1)[1].split("'", 1)[0]
                if process.needs_root([argv0]):
                    assert argv0 in ran, line
    finally:
        if node.proc is not None:
            node.stop()
        server.adm.delete_target(IQN)
        server.stop()
    # the privsep daemon ends with virtmanserver
    assert proc.is_gone(daemon)


def test_outside_the_allow_list_is_refused_by_the_daemon() -> None:
    """The same entry points, in a privsep daemon this test starts the way virtmanserver
    does: a command or knob outside the allow-lists is refused there with NotPermitted."""
    brick.privileged.start()
    try:
        who = process.whoami()
        assert who["pid"] != os.getpid()
        with pytest.raises(NotPermitted, match="not an allow-listed root command"):
            process.execute_root(["rm", "-rf", "/tmp/nothing"], None, 5.0, None)
        with pytest.raises(NotPermitted, match="allow-listed"):
            execute(["nsenter", "--net=/var/run/netns/vmtb", "sh", "-c", "id"])
        with pytest.raises(NotPermitted, match="not an allow-listed root daemon"):
            process.spawn_root(["sshd", "-D"], "/tmp/vmtb-sshd.log", None)
        with pytest.raises(NotPermitted, match="not an allow-listed kernel knob"):
            brick.privileged.sysfs.write_knob("/proc/sys/kernel/panic", "1")
        assert process.whoami()["executed"] == who["executed"]  # nothing ran
    finally:
        brick.privileged.stop()
    assert proc.is_gone(int(str(who["pid"])))  # stop() returns once the daemon has exited
    assert not brick.privileged.enabled()


def test_privsep_false_runs_in_virtmanserver(tmp_path: Path) -> None:
    """The operator's explicit opt-out: no privsep daemon, and a warning saying so."""
    node = VirtmanProcess(tmp_path / "node", host_ip="127.0.0.4", privsep=False)
    node.start()
    try:
        log = node.logs()
        assert "virtmanserver: privsep = false" in log
        assert not STARTED.search(log)
        assert status(tgtd_of(node.tgt_control_port))["PPid"] == str(node.pid)
    finally:
        node.stop()
