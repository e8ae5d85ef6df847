"""Issue 12, Build 1: virtmanserver owns its guests (virtman.guest.manager through the
daemon's guest_* XML-RPC methods), with real libvirtd + QEMU TCG and the tiny guest.

One node on 127.0.0.1 exports the guest's root image itself (create_image_target) and
deploys two guests on VMThunder snapshots of it; the power verbs are checked through
power_state and the console; then the Restart acceptance: ``kill -9`` of virtmanserver with
both guests running, a restart adopts them (same domain ids, QEMU not restarted), they are
listed with the same state, an orphan domain is reported and left alone, and stop + delete
leave nothing (domains, snapshots, console logs).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from brick.wait import wait_until
from tests.functional import vmfixtures
from tests.functional.virtmanproc import VirtmanProcess
from tests.functional.vmfixtures import domain_gone
from virtman.guest.domains import VirtualMachines
from virtmanclient import Client

pytestmark = pytest.mark.functional
libvirt_daemons = vmfixtures.libvirt_daemons
guest_image = vmfixtures.guest_image

LAB = os.environ.get("VMT_TEST_LAB", "vmt")
PREFIX = f"{LAB}{os.getpid()}-"  # instance names of this run: no other run's domains
BOOT_S = 180.0  # 10-20 s on an idle host; TCG slows 5x on a loaded one


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmt-guests-") as folder:
        yield Path(folder)


def marker_count(client: Client, userid: str, guest) -> int:
    text = client.call("guest_console_output", userid)
    return text.count(guest.expected_marker)


def wait_markers(client: Client, userid: str, guest, count: int) -> None:
    try:
        wait_until(
            lambda: marker_count(client, userid, guest) >= count,
            timeout_s=BOOT_S,
            what=f"{userid}'s boot marker #{count}",
            max_interval_s=0.2,
        )
    except Exception:
        print(f"{userid}'s console:\n" + client.call("guest_console_output", userid)[-3000:])
        raise


def domain_ids(uri: str, instances: list[str]) -> dict[str, int]:
    conn = libvirt.open(uri)
    try:
        return {i: conn.lookupByName(f"vmt-{i}").ID() for i in instances}
    finally:
        conn.close()


def qemu_pids(instances: list[str]) -> dict[str, int]:
    return {i: int(Path(f"/run/libvirt/qemu/vmt-{i}.pid").read_text().strip()) for i in instances}


def leftover_processes(workdir: Path, tgt_control_port: int) -> list[str]:
    """Command lines of running processes that name ``workdir`` or the node's tgtd control
    port (the node's daemons)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in args or f"tgtd -f -C {tgt_control_port} " in args:
            found.append(args)
    return found


def test_issue_12_guests_boot_obey_power_verbs_and_survive_kill_9(
    libvirt_daemons, guest_image, workdir: Path
) -> None:
    guest = guest_image
    node = VirtmanProcess(
        workdir / "node",
        guest_libvirt_uri=libvirt_daemons.uri,
        guest_kernel=guest.kernel,
        guest_initrd=guest.initrd,
        guest_cmdline=f"{guest.cmdline} vmt.stay",
        guest_name_prefix=PREFIX,
        heartbeat_interval=1,  # a short readers' grace period at the final stop
    )
    image = node.image_dir / "tiny.raw"
    shutil.copy(guest.rootfs, image)
    users, instances = ["G1", "G2"], [f"{PREFIX}G1", f"{PREFIX}G2"]
    orphan = f"{PREFIX}ORPHAN"
    vms = VirtualMachines(libvirt_daemons.uri)
    started = time.monotonic()
    node.start()
    try:
        client = node.client(timeout=120)
        assert client.call("create_image_target", "tiny", str(image)).startswith("0:")

        # create + deploy: recorded, then a snapshot and a defined (not started) domain
        for userid in ("g1", "G2"):  # upper-cased on input
            assert client.call("guest_create", userid, 1, 128, 0) is True
        assert client.call("guest_list") == users
        assert client.call("guest_power_state", "G1") == "off"
        with pytest.raises(Exception, match="no disk deployed"):
            client.call("guest_action", "G1", "start")
        for userid in users:
            assert client.call("guest_deploy", userid, "tiny") is True
        assert sorted(client.call("list")) == [f"{i}:volume-tiny" for i in instances]
        assert client.call("guest_power_state", "G1") == "off"
        for userid in users:
            client.call("guest_action", userid, "start")
        for userid in users:
            wait_markers(client, userid, guest, 1)
            assert client.call("guest_power_state", userid) == "on"
        boot_s = time.monotonic() - started
        info = client.call("guest_info", "G1")
        assert (info["power_state"], info["num_cpu"], info["max_mem_kb"]) == ("on", 1, 131072)

        definition = client.call("guest_definition", "G1")
        assert "<name>vmt-" + instances[0] + "</name>" in definition
        snapshot = node.state_dir / "instances" / f"{instances[0]}.qcow2"  # Virtman.create's
        assert f"<source file='{snapshot}'" in definition, definition
        stats = client.call("guest_stats", "G1")
        assert int(stats["cpu"]["cpu_time"]) > 0 and stats["nics"] == []
        host = client.call("guest_host_info")
        assert len(host) == 12 and host["vcpus_used"] >= 2 and host["memory_mb"] > 0
        assert host["ipl_time"].startswith("IPL at ")

        # power verbs, G1
        client.call("guest_action", "G1", "pause")
        assert client.call("guest_power_state", "G1") == "paused"
        client.call("guest_action", "G1", "unpause")
        assert client.call("guest_power_state", "G1") == "on"
        client.call("guest_action", "G1", "reset")  # hard reset: the kernel boots again
        wait_markers(client, "G1", guest, 2)
        assert client.call("guest_power_state", "G1") == "on"
        client.call("guest_action", "G1", "reboot")  # ACPI: busybox ignores it, still on
        assert client.call("guest_power_state", "G1") == "on"
        t0 = time.monotonic()
        options = {"timeout_s": 1.0, "poll_interval_s": 0.2}
        client.call("guest_action", "G1", "softstop", options)  # no ACPI handler: forced
        assert time.monotonic() - t0 < 20
        assert client.call("guest_power_state", "G1") == "off"
        client.call("guest_action", "G1", "start")
        wait_markers(client, "G1", guest, 1)  # the console starts afresh
        assert client.call("guest_power_state", "G1") == "on"
        verbs_s = time.monotonic() - started - boot_s

        # an orphan: a domain of ours (metadata, prefix) that no guest record knows
        xml = vms.render(
            orphan, image, kernel=guest.kernel, initrd=guest.initrd, cmdline=guest.cmdline,
            console_log=workdir / "orphan.log", disk_format="raw",
        )  # fmt: skip
        vms.define(orphan, xml)

        # Restart acceptance: kill -9 with both guests running
        before_ids, before_pids = domain_ids(libvirt_daemons.uri, instances), qemu_pids(instances)
        states = {u: client.call("guest_power_state", u) for u in users}
        assert states == {"G1": "on", "G2": "on"}
        os.kill(node.pid, signal.SIGKILL)
        node.proc.wait(timeout=30)
        node.start()
        client = node.client(timeout=120)
        assert client.call("guest_list") == users
        assert {u: client.call("guest_power_state", u) for u in users} == states
        assert domain_ids(libvirt_daemons.uri, instances) == before_ids  # not restarted
        assert qemu_pids(instances) == before_pids
        assert client.call("guest_orphans") == [orphan]
        assert "orphan: domain vmt-" + orphan in node.logs()
        assert vms.info(orphan).state == "shutoff"  # reported, left defined
        assert sorted(client.call("list")) == [f"{i}:volume-tiny" for i in instances]
        assert client.call("guest_console_output", "G2").count(guest.expected_marker) == 1

        # stop and delete: nothing left
        for userid in users:
            client.call("guest_action", userid, "stop")
            assert client.call("guest_power_state", userid) == "off"
            assert client.call("guest_delete", userid) is True
        with pytest.raises(Exception, match="does not exist"):
            client.call("guest_delete", "G1")
        assert client.call("guest_list") == []
        assert client.call("list") == []
        assert all(domain_gone(libvirt_daemons.uri, f"vmt-{i}") for i in instances)
        assert list((node.state_dir / "instances").glob("*.qcow2")) == []
        assert list((node.state_dir / "guests").iterdir()) == []
        assert node.stop() == 0  # and its tgtd and qemu-storage-daemon with it
        assert leftover_processes(workdir, node.tgt_control_port) == []
        assert str(workdir) not in Path("/proc/mounts").read_text()  # no FUSE export left
        print(
            f"\n2 guests deployed + booted in {boot_s:.1f} s; power verbs {verbs_s:.1f} s; "
            f"whole test {time.monotonic() - started:.1f} s"
        )
    finally:
        for instance in [*instances, orphan]:
            try:
                vms.destroy(instance)
            except Exception as exc:
                print(f"cleanup {instance}: {exc}")
        vms.close()
        if node.proc is not None and node.proc.poll() is None:
            node.stop()
