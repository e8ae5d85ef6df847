"""virtman.guest.manager.Guests on a fake libvirt connection and a fake Virtman (real
journal, real VirtualMachines rendering): records, deploy, power verbs, delete, adoption."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from virtman.capture import Captured, CaptureFailed
from virtman.errors import (
    GuestExists,
    GuestNotFound,
    GuestStateError,
    InstanceExists,
    InstanceNotFound,
    InvalidInput,
    VirtmanError,
)
from virtman.guest.domains import METADATA_NS, VirtualMachines
from virtman.guest.manager import HOST_INFO_KEYS, Guests, power_state_of, validate_userid
from virtman.journal import Journal

PREFIX = "guest-"


def libvirt_error(code: int, message: str = "fake") -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, 0, message, 0, "", None, None, 0, 0)
    return err


class FakeDomain:
    def __init__(self, conn: FakeConnection, xml: str) -> None:
        self.conn = conn
        self.xml = xml
        root = ET.fromstring(xml)
        self._name = root.findtext("name")
        tag = root.find(f"metadata/{{{METADATA_NS}}}instance")
        self.instance = None if tag is None else tag.text
        self.vcpus = int(root.findtext("vcpu") or 1)
        self.state_ = libvirt.VIR_DOMAIN_SHUTOFF
        self.id = -1
        self.calls: list[str] = []
        self.obeys_acpi = True

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return "00000000-0000-0000-0000-000000000000"

    def metadata(self, kind: int, ns: str) -> str:
        if self.instance is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_METADATA)
        return f"<instance>{self.instance}</instance>"

    def isActive(self) -> bool:
        return self.state_ != libvirt.VIR_DOMAIN_SHUTOFF

    def state(self) -> list[int]:
        return [self.state_, 0]

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml

    def _need_active(self) -> None:
        if not self.isActive():
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running")

    def create(self) -> None:
        if self.isActive():
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "already running")
        self.calls.append("create")
        self.state_ = libvirt.VIR_DOMAIN_RUNNING
        self.id = self.conn.next_id = self.conn.next_id + 1

    def destroy(self) -> None:
        self._need_active()
        self.calls.append("destroy")
        self.state_, self.id = libvirt.VIR_DOMAIN_SHUTOFF, -1

    def shutdown(self) -> None:
        self._need_active()
        self.calls.append("shutdown")
        if self.obeys_acpi:
            self.state_, self.id = libvirt.VIR_DOMAIN_SHUTOFF, -1

    def suspend(self) -> None:
        self._need_active()
        self.calls.append("suspend")
        self.state_ = libvirt.VIR_DOMAIN_PAUSED

    def resume(self) -> None:
        self._need_active()
        self.calls.append("resume")
        self.state_ = libvirt.VIR_DOMAIN_RUNNING

    def reboot(self, flags: int) -> None:
        self._need_active()
        self.calls.append("reboot")

    def reset(self, flags: int) -> None:
        self._need_active()
        self.calls.append("reset")

    def undefineFlags(self, flags: int) -> None:
        self.calls.append("undefine")
        del self.conn.domains[self._name]

    def info(self) -> list[int]:
        return [self.state_, 262144, 262144 if self.isActive() else 0, self.vcpus, 5_000_000_000]

    def getCPUStats(self, total: bool) -> list[dict[str, int]]:
        self._need_active()
        return [{"cpu_time": 5_000_000_000, "user_time": 1, "system_time": 2}]

    def attachDeviceFlags(self, xml: str, flags: int) -> None:
        mac = ET.fromstring(xml).find("mac").get("address")
        self.calls.append(f"attach {mac} {flags}")
        if mac == self.conn.refuse_mac:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, f"no bridge for {mac}")
        root = ET.fromstring(self.xml)
        root.find("devices").append(ET.fromstring(xml))
        self.xml = ET.tostring(root, encoding="unicode")

    def detachDeviceFlags(self, xml: str, flags: int) -> None:
        mac = ET.fromstring(xml).find("mac").get("address")
        self.calls.append(f"detach {mac} {flags}")
        root = ET.fromstring(self.xml)
        devices = root.find("devices")
        [iface] = [i for i in devices.findall("interface") if i.find("mac").get("address") == mac]
        devices.remove(iface)
        self.xml = ET.tostring(root, encoding="unicode")

    def interfaceStats(self, dev: str) -> tuple[int, ...]:
        self.calls.append(f"interfaceStats {dev}")
        return (1, 2, 3, 4, 5, 6, 7, 8)

    def memoryStats(self) -> dict[str, int]:
        return {"actual": 131072, "rss": 90000}

    # live migration: the guest lands on ``dconn`` (another FakeConnection) with its XML
    def migrate3(self, dconn: FakeConnection, params: dict[str, Any], flags: int) -> FakeDomain:
        self._need_active()
        self.calls.append("migrate3")
        if self.conn.fail_migrate:
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED, "migration job: aborted")
        arrived = dconn.defineXML(params[libvirt.VIR_MIGRATE_PARAM_DEST_XML])
        arrived.state_ = libvirt.VIR_DOMAIN_RUNNING
        self.state_, self.id = libvirt.VIR_DOMAIN_SHUTOFF, -1
        return arrived

    def jobStats(self, flags: int = 0) -> dict[str, int]:
        return {"disk_processed": 16 << 20, "memory_processed": 90 << 20,
                "data_processed": 106 << 20, "downtime": 40}  # fmt: skip

    def blockInfo(self, dev: str) -> list[int]:
        return [64 << 20, 17 << 20, 17 << 20]

    def blockStats(self, dev: str) -> tuple[int, ...]:
        return (10, 4096, 20, 16 << 20, 0)


class FakeConnection:
    def __init__(self) -> None:
        self.domains: dict[str, FakeDomain] = {}
        self.next_id = 0
        self.refuse_mac: str | None = None  # attachDeviceFlags fails for this NIC
        self.fail_migrate = False

    def isAlive(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def defineXML(self, xml: str) -> FakeDomain:
        dom = FakeDomain(self, xml)
        old = self.domains.get(dom.name())
        if old is not None:
            dom.state_, dom.id, dom.calls = old.state_, old.id, old.calls
        self.domains[dom.name()] = dom
        return dom

    def lookupByName(self, name: str) -> FakeDomain:
        try:
            return self.domains[name]
        except KeyError:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN) from None

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        doms = list(self.domains.values())
        return [d for d in doms if d.isActive()] if flags == 1 else doms

    def getInfo(self) -> list[Any]:
        return ["x86_64", 24000, 2, 2400, 1, 1, 2, 1]

    def getFreeMemory(self) -> int:
        return 20000 << 20

    def getType(self) -> str:
        return "QEMU"

    def getVersion(self) -> int:
        return 7002022

    def getHostname(self) -> str:
        return "node1"


class FakeVirtman:
    """Virtman's create/destroy/list answers, recording its instances in the journal."""

    def __init__(self, journal: Journal, folder: Path) -> None:
        self.journal = journal
        self.folder = folder
        self.calls: list[tuple[Any, ...]] = []
        self.fail_create: str | None = None

    def create(self, instance: str, image: str, connections: Any, snapshot: Any) -> str:
        self.calls.append(("create", instance, image, connections))
        if self.fail_create:
            return self.fail_create
        path = self.folder / f"{instance}.qcow2"
        path.write_bytes(b"")
        self.journal.put("instances", instance, {"image": image, "path": str(path)})
        return f"0:{path}"

    def destroy(self, instance: str) -> str:
        self.calls.append(("destroy", instance))
        if instance not in self.journal.instances():
            return f"1:Virtman: the instance_name '{instance}' does not exist!"
        (self.folder / f"{instance}.qcow2").unlink(missing_ok=True)
        self.journal.drop("instances", instance)
        return "0:"

    def list(self) -> list[str]:
        return [f"{i}:{r['image']}" for i, r in sorted(self.journal.instances().items())]


@pytest.fixture
def rig(tmp_path: Path) -> dict[str, Any]:
    return make_rig(tmp_path)


def make_rig(tmp_path: Path) -> dict[str, Any]:
    """A node's guests over a fake libvirt connection and a fake Virtman in ``tmp_path``."""
    boot = tmp_path / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(b"k")
    (boot / "initrd").write_bytes(b"i")
    conn = FakeConnection()
    journal = Journal(tmp_path / "state" / "journal.json")
    disks = tmp_path / "instances"
    disks.mkdir()
    virtman = FakeVirtman(journal, disks)

    def make() -> Guests:
        vms = VirtualMachines("test:///unused")
        vms._conn = conn  # the fake connection instead of libvirtd
        return Guests(
            virtman,
            vms,
            connections=lambda image: {"target_iqn": f"iqn.x:{image}"},
            console_dir=tmp_path / "state" / "guests",
            kernel=str(boot / "vmlinuz"),
            initrd=str(boot / "initrd"),
            cmdline="root=/dev/vda console=ttyS0",
            name_prefix=PREFIX,
            state_dir=tmp_path,
        )

    return {"conn": conn, "virtman": virtman, "journal": journal, "make": make}


def deployed(rig: dict[str, Any], *userids: str) -> Guests:
    guests = rig["make"]()
    for userid in userids:
        guests.create(userid, vcpus=2, memory_mb=256)
        guests.deploy(userid, "tiny")
    return guests


@pytest.mark.parametrize("bad", ["", "ABCDEFGHI", "a-b", "a b", "é", None, 7])
def test_userids_are_1_to_8_alphanumerics(bad: object) -> None:
    with pytest.raises(InvalidInput, match="userid"):
        validate_userid(bad)


def test_create_records_upper_cased_and_refuses_twice_and_bad_sizes(rig) -> None:
    guests = rig["make"]()
    guests.create("vm2", vcpus=1, memory_mb=128)
    guests.create("VM1", vcpus=2, memory_mb=256, disk_gb=5)
    assert guests.list() == ["VM1", "VM2"]
    with pytest.raises(GuestExists) as caught:
        guests.create("Vm1", vcpus=1, memory_mb=128)
    assert isinstance(caught.value, InstanceExists)
    for field, kwargs in [
        ("vcpus", {"vcpus": 0, "memory_mb": 128}),
        ("vcpus", {"vcpus": True, "memory_mb": 128}),
        ("memory_mb", {"vcpus": 1, "memory_mb": 16}),
        ("memory_mb", {"vcpus": 1, "memory_mb": "128"}),
        ("disk_gb", {"vcpus": 1, "memory_mb": 128, "disk_gb": -1}),
    ]:
        with pytest.raises(InvalidInput, match=field):
            guests.create("VM3", **kwargs)
    assert guests.list() == ["VM1", "VM2"]
    assert rig["conn"].domains == {}  # no domain before deploy
    assert guests.power_state("VM1") == "off"
    assert guests.info("vm1") == {
        "power_state": "off", "max_mem_kb": 262144, "mem_kb": 0, "num_cpu": 2, "cpu_time_us": 0
    }  # fmt: skip
    with pytest.raises(GuestStateError, match="no disk deployed"):
        guests.start("VM1")


def test_deploy_makes_the_snapshot_and_defines_a_stopped_domain_on_it(rig) -> None:
    guests = deployed(rig, "VM1")
    assert rig["virtman"].calls == [
        ("create", "guest-VM1", "volume-tiny", {"target_iqn": "iqn.x:volume-tiny"})
    ]
    dom = rig["conn"].domains["vmt-guest-VM1"]
    assert not dom.isActive()
    root = ET.fromstring(dom.xml)
    assert root.findtext("vcpu") == "2"
    assert root.findtext("memory") == "256"
    assert root.findtext("on_reboot") == "restart"
    disk = rig["journal"].instances()["guest-VM1"]["path"]
    assert root.find("devices/disk/source").get("file") == disk
    assert root.find("devices/disk/driver").get("type") == "qcow2"
    record = rig["journal"].records("guests")["VM1"]
    assert (record["image"], record["disk"], record["state"]) == ("volume-tiny", disk, "off")
    assert guests.power_state("VM1") == "off"
    with pytest.raises(GuestStateError, match="deployed already"):
        guests.deploy("VM1", "tiny")
    with pytest.raises(GuestNotFound):
        guests.deploy("VM9", "tiny")


def test_a_failed_snapshot_leaves_the_guest_undeployed(rig) -> None:
    guests = rig["make"]()
    guests.create("VM1", vcpus=1, memory_mb=128)
    rig["virtman"].fail_create = "2:Virtman: create failed: no path"
    with pytest.raises(VirtmanError, match="no path"):
        guests.deploy("VM1", "tiny")
    assert rig["conn"].domains == {}
    assert rig["journal"].records("guests")["VM1"]["disk"] is None
    assert not rig["journal"].records("guests")["VM1"].get("deploying")
    rig["virtman"].fail_create = None
    guests.deploy("VM1", "tiny")  # may be tried again
    assert guests.power_state("VM1") == "off"


def test_a_failed_define_releases_the_snapshot(rig, monkeypatch) -> None:
    guests = rig["make"]()
    guests.create("VM1", vcpus=1, memory_mb=128)

    def refuse(xml: str) -> None:
        raise libvirt_error(libvirt.VIR_ERR_XML_ERROR, "bad xml")

    monkeypatch.setattr(rig["conn"], "defineXML", refuse)
    with pytest.raises(VirtmanError, match="bad xml"):
        guests.deploy("VM1", "tiny")
    assert rig["virtman"].calls[-1] == ("destroy", "guest-VM1")
    assert rig["journal"].instances() == {}
    assert rig["journal"].records("guests")["VM1"]["disk"] is None


def test_power_verbs_reach_the_domain_and_the_journal(rig) -> None:
    guests = deployed(rig, "VM1")
    dom = rig["conn"].domains["vmt-guest-VM1"]
    for verb in ("pause", "unpause", "reboot", "reset"):
        with pytest.raises(GuestStateError, match="it is off"):
            getattr(guests, verb)("VM1")
    guests.start("VM1")
    assert guests.power_state("VM1") == "on"
    guests.start("VM1")  # running: nothing to do
    guests.pause("VM1")
    assert guests.power_state("VM1") == "paused"
    assert rig["journal"].records("guests")["VM1"]["state"] == "paused"
    guests.unpause("VM1")
    guests.reboot("VM1")
    guests.reset("VM1")
    assert guests.power_state("VM1") == "on"
    info = guests.info("VM1")
    assert info == {
        "power_state": "on", "max_mem_kb": 262144, "mem_kb": 262144, "num_cpu": 2,
        "cpu_time_us": 5_000_000,
    }  # fmt: skip
    stats = guests.stats("VM1")
    assert stats["cpu"]["cpu_time"] == 5_000_000_000 and stats["mem"]["rss"] == 90000
    assert stats["nics"] == []
    assert "<name>vmt-guest-VM1</name>" in guests.definition("VM1")
    guests.stop("VM1")
    assert guests.power_state("VM1") == "off"
    assert guests.stats("VM1") == {"cpu": {}, "mem": {}, "nics": []}
    assert dom.calls == ["create", "suspend", "resume", "reboot", "reset", "destroy"]
    assert rig["journal"].records("guests")["VM1"]["state"] == "off"


def test_stats_reads_each_nic_of_the_definition(rig) -> None:
    guests = deployed(rig, "VM1")
    guests.start("VM1")
    dom = rig["conn"].domains["vmt-guest-VM1"]
    dom.xml = dom.xml.replace(
        "<devices>",
        "<devices><interface type='bridge'><mac address='52:54:00:00:00:01'/>"
        "<target dev='vnet7'/></interface>",
    )
    assert guests.stats("VM1")["nics"] == [
        {"vdev": "vnet7", "mac": "52:54:00:00:00:01", "rx_bytes": 1, "rx_packets": 2,
         "rx_errs": 3, "rx_drop": 4, "tx_bytes": 5, "tx_packets": 6, "tx_errs": 7, "tx_drop": 8}
    ]  # fmt: skip


def test_a_domain_undefined_behind_our_back_is_defined_again_at_the_next_verb(rig) -> None:
    guests = deployed(rig, "VM1")
    del rig["conn"].domains["vmt-guest-VM1"]
    assert guests.power_state("VM1") == "off"
    guests.start("VM1")
    assert guests.power_state("VM1") == "on"
    assert rig["conn"].domains["vmt-guest-VM1"].calls == ["create"]


def test_softstop_waits_for_acpi_then_forces_off(rig) -> None:
    guests = deployed(rig, "VM1", "VM2")
    doms = rig["conn"].domains
    guests.start("VM1")
    guests.start("VM2")
    guests.softstop("VM1", timeout_s=5, poll_interval_s=0.01)
    assert doms["vmt-guest-VM1"].calls == ["create", "shutdown"]  # stopped by itself
    doms["vmt-guest-VM2"].obeys_acpi = False
    guests.softstop("VM2", timeout_s=0.1, poll_interval_s=0.01)
    assert doms["vmt-guest-VM2"].calls == ["create", "shutdown", "destroy"]
    assert guests.power_state("VM2") == "off"
    with pytest.raises(InvalidInput, match="timeout"):
        guests.softstop("VM2", timeout_s=-1)


def test_delete_powers_off_undefines_and_releases_the_snapshot(rig) -> None:
    guests = deployed(rig, "VM1")
    guests.create("VM2", vcpus=1, memory_mb=128)  # never deployed
    guests.start("VM1")
    console = guests.console_dir / "guest-VM1.log"
    console.write_text("VMT-BOOTED host=x\n")
    assert guests.console_output("VM1") == "VMT-BOOTED host=x\n"
    guests.delete("vm1")
    guests.delete("VM2")
    assert rig["conn"].domains == {}
    assert rig["journal"].instances() == {}
    assert ("destroy", "guest-VM1") in rig["virtman"].calls
    assert ("destroy", "guest-VM2") not in rig["virtman"].calls
    assert not console.exists()
    assert guests.list() == []
    with pytest.raises(GuestNotFound) as caught:
        guests.delete("VM1")
    assert isinstance(caught.value, InstanceNotFound)


def test_restart_adopts_running_domains_and_reports_orphans_without_touching_them(rig) -> None:
    guests = deployed(rig, "VM1", "VM2", "VM3")
    guests.start("VM1")
    guests.start("VM2")
    guests.pause("VM2")
    doms = rig["conn"].domains
    ids = {name: dom.id for name, dom in doms.items()}
    # an orphan (ours, with the prefix, no record) and a domain of the demo (other prefix)
    vms = VirtualMachines("test:///unused")
    vms._conn = rig["conn"]
    for instance in ("guest-LOST", "demo-vm"):
        xml = vms.render(
            instance, guests.kernel, kernel=guests.kernel, initrd=guests.initrd, cmdline="",
            console_log=guests.console_dir / "x.log", disk_format="raw",
        )  # fmt: skip
        rig["conn"].defineXML(xml).create()
    del doms["vmt-guest-VM3"]  # its domain vanished meanwhile (the disk is still there)
    before = {n: list(d.calls) for n, d in doms.items()}

    again = rig["make"]()  # the daemon restarted
    again.adopt()
    assert again.list() == ["VM1", "VM2", "VM3"]
    assert [again.power_state(u) for u in ("VM1", "VM2", "VM3")] == ["on", "paused", "off"]
    assert {n: list(d.calls) for n, d in doms.items() if n in before} == before  # untouched
    assert {n: doms[n].id for n in ("vmt-guest-VM1", "vmt-guest-VM2")} == {
        n: ids[n] for n in ("vmt-guest-VM1", "vmt-guest-VM2")
    }  # same domain ids: not restarted
    assert "vmt-guest-VM3" in doms  # defined again from its record
    assert again.orphans() == ["guest-LOST"]
    assert doms["vmt-guest-LOST"].isActive()  # reported, never destroyed
    assert rig["virtman"].calls.count(("destroy", "guest-VM1")) == 0


def test_restart_undoes_a_deploy_the_crash_interrupted(rig) -> None:
    guests = rig["make"]()
    guests.create("VM1", vcpus=1, memory_mb=128)
    record = rig["journal"].records("guests")["VM1"]
    rig["journal"].put("guests", "VM1", {**record, "deploying": "volume-tiny"})
    rig["virtman"].create("guest-VM1", "volume-tiny", {}, None)  # the disk was made
    again = rig["make"]()
    again.adopt()
    assert rig["virtman"].calls[-1] == ("destroy", "guest-VM1")
    assert rig["journal"].instances() == {}
    assert not rig["journal"].records("guests")["VM1"].get("deploying")
    again.deploy("VM1", "tiny")  # and it can be deployed again
    assert again.power_state("VM1") == "off"


def test_host_info_has_the_12_keys_of_host_get_info(rig) -> None:
    guests = deployed(rig, "VM1")
    guests.start("VM1")
    info = rig["make"]().host_info()
    assert tuple(info) == HOST_INFO_KEYS
    assert (info["hypervisor_type"], info["vcpus"], info["vcpus_used"]) == ("qemu", 2, 2)
    assert (info["memory_mb"], info["memory_mb_used"]) == (24000, 4000)
    assert info["ipl_time"].startswith("IPL at ")


@pytest.mark.parametrize(
    ("state", "power"),
    [
        (libvirt.VIR_DOMAIN_RUNNING, "on"),
        (libvirt.VIR_DOMAIN_BLOCKED, "on"),
        (libvirt.VIR_DOMAIN_PAUSED, "paused"),
        (libvirt.VIR_DOMAIN_SHUTOFF, "off"),
        (libvirt.VIR_DOMAIN_CRASHED, "off"),
    ],
)
def test_power_state_of_libvirt_states(state: int, power: str) -> None:
    assert power_state_of(state) == power


def test_xmlrpc_methods_validate_actions_and_carry_large_integers(rig) -> None:
    from virtman.server import Methods

    guests = deployed(rig, "VM1")
    methods = Methods(None, None, guests)  # type: ignore[arg-type]
    assert methods.guest_list() == ["VM1"]
    assert methods.guest_action("VM1", "start") is True
    assert methods.guest_power_state("VM1") == "on"
    for action, options in [("explode", None), ("softstop", {"timeout": 1}), ("softstop", 3)]:
        with pytest.raises(InvalidInput):
            methods.guest_action("VM1", action, options)
    assert methods.guest_action("VM1", "softstop", {"timeout_s": 1, "poll_interval_s": 0.01})
    assert methods.guest_power_state("VM1") == "off"
    methods.guest_action("VM1", "start")
    assert methods.guest_info("VM1")["cpu_time_us"] == 5_000_000  # fits: stays an int
    assert methods.guest_stats("VM1")["cpu"]["cpu_time"] == "5000000000"  # > 2**31: a string
    assert methods.guest_delete("VM1") is True
    with pytest.raises(VirtmanError, match="serves no guests"):
        Methods(None, None).guest_list()  # type: ignore[arg-type]


def test_capture_pauses_a_running_guest_for_the_copy_and_resumes_it_even_on_failure(
    rig,
) -> None:
    guests = deployed(rig, "VM1")
    dom = rig["conn"].domains["vmt-guest-VM1"]
    virtman = rig["virtman"]
    seen: list[int] = []

    def capture_image(instance: str, image: str) -> Any:
        seen.append(dom.state()[0])  # the guest's state while its disk is copied
        if image == "broken":
            raise CaptureFailed(image, "disk full")
        return Captured(f"volume-{image}", f"/images/volume-{image}.raw", 4096, {"x": 1})

    virtman.capture_image = capture_image
    guests.start("VM1")
    assert guests.capture("VM1", "gold")["target"] == "volume-gold"
    with pytest.raises(CaptureFailed, match="disk full"):
        guests.capture("VM1", "broken")
    assert seen == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED]
    assert guests.power_state("VM1") == "on"
    assert dom.calls == ["create", "suspend", "resume", "suspend", "resume"]
    guests.pause("VM1")  # paused by its owner: stays paused after the capture
    guests.capture("VM1", "silver")
    assert guests.power_state("VM1") == "paused"
    guests.stop("VM1")  # off: nothing to pause
    guests.capture("VM1", "bronze")
    assert dom.calls[-2:] == ["suspend", "destroy"]


def nics_of(dom: FakeDomain) -> list[tuple[str, str, str]]:
    root = ET.fromstring(dom.xml)
    return [
        (i.get("type"), i.find("source").get("bridge"), i.find("mac").get("address"))
        for i in root.findall("devices/interface")
    ]


NIC_A = {"vdev": "1000", "bridge": "br-a", "mac_addr": "52:54:00:00:00:0a"}
NIC_B = {"vdev": "1003", "bridge": "br-a", "mac_addr": "52:54:00:00:00:0b"}
CONFIG, LIVE = libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_AFFECT_LIVE


def test_nics_recorded_before_deploy_are_in_the_domain_it_defines(rig) -> None:
    guests = rig["make"]()
    guests.create("VM1", vcpus=1, memory_mb=128)
    guests.set_nics("VM1", [NIC_A])
    guests.deploy("VM1", "tiny")
    dom = rig["conn"].domains["vmt-guest-VM1"]
    assert nics_of(dom) == [("bridge", "br-a", "52:54:00:00:00:0a")]
    model = ET.fromstring(dom.xml).find("devices/interface/model").get("type")
    assert model == "virtio"


def test_nics_of_a_deployed_guest_are_attached_and_detached(rig) -> None:
    guests = deployed(rig, "VM1")
    dom = rig["conn"].domains["vmt-guest-VM1"]
    guests.set_nics("VM1", [NIC_A, NIC_B])
    assert nics_of(dom) == [
        ("bridge", "br-a", m) for m in ("52:54:00:00:00:0a", "52:54:00:00:00:0b")
    ]
    assert "attach 52:54:00:00:00:0a 2" in dom.calls  # the definition only: it is off
    guests.start("VM1")
    guests.set_nics("VM1", [NIC_B], live=True)  # running and live: the guest changes at once
    assert f"detach 52:54:00:00:00:0a {CONFIG | LIVE}" in dom.calls
    assert nics_of(dom) == [("bridge", "br-a", "52:54:00:00:00:0b")]
    assert [n["vdev"] for n in rig["journal"].records("guests")["VM1"]["nics"]] == ["1003"]
    # a domain defined again (lost behind our back) keeps them
    del rig["conn"].domains["vmt-guest-VM1"]
    guests.stop("VM1")
    assert nics_of(rig["conn"].domains["vmt-guest-VM1"]) == [
        ("bridge", "br-a", "52:54:00:00:00:0b")
    ]


def test_a_refused_nic_undoes_the_others_and_changes_nothing(rig) -> None:
    guests = deployed(rig, "VM1")
    dom = rig["conn"].domains["vmt-guest-VM1"]
    guests.set_nics("VM1", [NIC_A])
    rig["conn"].refuse_mac = "52:54:00:00:00:0b"
    nic_c = {"vdev": "1001", "bridge": "br-a", "mac_addr": "52:54:00:00:00:0c"}
    with pytest.raises(VirtmanError, match="no bridge for 52:54:00:00:00:0b"):
        guests.set_nics("VM1", [nic_c, NIC_B])  # A detached, C attached, B refused
    assert "attach 52:54:00:00:00:0c 2" in dom.calls and "detach 52:54:00:00:00:0c 2" in dom.calls
    assert nics_of(dom) == [("bridge", "br-a", "52:54:00:00:00:0a")]
    assert [n["vdev"] for n in rig["journal"].records("guests")["VM1"]["nics"]] == ["1000"]


# -- create and deploy once (the cluster controller's verbs over the bus) ----------------------
def test_create_once_and_deploy_once_do_it_once_and_refuse_a_contradiction(rig) -> None:
    guests = rig["make"]()
    assert guests.create_once("vm1", 1, 128) is True
    assert guests.create_once("VM1", 1, 128) is False  # the same call again: a no-op
    with pytest.raises(GuestStateError, match="exists with"):
        guests.create_once("VM1", 2, 128)
    assert guests.deploy_once("VM1", "tiny") is True
    assert guests.deploy_once("VM1", "volume-tiny") is False
    with pytest.raises(GuestStateError, match="deployed already"):
        guests.deploy_once("VM1", "other")
    creates = [c for c in rig["virtman"].calls if c[0] == "create"]
    assert len(creates) == 1  # one snapshot, one domain
    assert len(rig["conn"].domains) == 1


def test_deploy_once_sent_twice_at_once_makes_one_disk(rig) -> None:
    """The copy of a deploy (the bus lost the first one's answer) waits for the first."""
    guests = rig["make"]()
    guests.create_once("VM1", 1, 128)
    virtman = rig["virtman"]
    entered, release = threading.Event(), threading.Event()
    create = virtman.create

    def slow_create(*args: Any) -> str:
        entered.set()
        assert release.wait(10)
        return create(*args)

    virtman.create = slow_create
    results: list[bool] = []
    first = threading.Thread(target=lambda: results.append(guests.deploy_once("VM1", "tiny")))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=lambda: results.append(guests.deploy_once("VM1", "tiny")))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waits on the guest's lock
    release.set()
    first.join(10)
    second.join(10)
    assert sorted(results) == [False, True]
    assert len([c for c in virtman.calls if c[0] == "create"]) == 1
