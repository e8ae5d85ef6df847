"""Issue 13 item 5, a node's side: ``prepare_incoming`` / ``migrate`` / ``finish_incoming`` /
``abort_incoming`` of ``Guests`` over fake libvirt connections, and the destination XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.unit.virtman.test_guests import deployed, make_rig
from virtman.errors import GuestExists, GuestStateError, InvalidInput, VirtmanError
from virtman.guest import migration
from virtman.guest.domains import VMError
from virtman.guest.records import KIND

INCOMING_KEYS = {"domain", "disk", "console", "kernel", "initrd", "libvirt_uri", "host"}


@pytest.fixture
def nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    source, target = make_rig(tmp_path / "a"), make_rig(tmp_path / "b")
    # the source's libvirt opens the destination's (fake) daemon
    monkeypatch.setattr(migration.libvirt, "open", lambda uri: target["conn"])
    return source, target


def _running(rig: dict[str, Any]) -> Any:
    guests = deployed(rig, "VM1")
    guests.start("VM1")
    return guests


def test_a_guest_moves_with_its_figures_and_leaves_nothing_on_its_source(nodes) -> None:
    source, target = nodes
    here, there = _running(source), target["make"]()
    incoming = there.prepare_incoming("vm1", 2, 256, "tiny")
    assert set(incoming) == INCOMING_KEYS
    assert there.journal.records(KIND)["VM1"]["state"] == "incoming"
    assert Path(incoming["disk"]).parent == target["virtman"].folder  # its own snapshot
    assert target["virtman"].calls[0][:3] == ("create", "guest-VM1", "volume-tiny")

    figures = here.migrate("VM1", incoming)
    assert figures["disk_bytes"] == 16 << 20 and figures["memory_bytes"] == 90 << 20
    assert figures["disk_virtual_bytes"] == 64 << 20 and figures["guest_written_bytes"] == 16 << 20
    # the destination XML points at the destination's disk and console
    arrived = target["conn"].domains["vmt-guest-VM1"]
    root = ET.fromstring(arrived.xml)
    assert root.find("devices/disk/source").get("file") == incoming["disk"]
    assert {s.get("path") for s in root.findall("devices/serial/source")} == {incoming["console"]}
    # the source: domain undefined, snapshot released, record gone
    assert source["conn"].domains == {} and here.list() == []
    assert ("destroy", "guest-VM1") in source["virtman"].calls

    there.finish_incoming("VM1")
    assert there.journal.records(KIND)["VM1"]["state"] == "on"
    assert there.power_state("VM1") == "on"
    with pytest.raises(GuestStateError, match="not arriving"):
        there.finish_incoming("VM1")
    assert there.abort_incoming("VM1") == "kept"  # a guest of its own now: untouched
    assert there.list() == ["VM1"]


def test_a_failed_migration_keeps_the_guest_and_abort_leaves_nothing(nodes) -> None:
    source, target = nodes
    here, there = _running(source), target["make"]()
    incoming = there.prepare_incoming("VM1", 2, 256, "tiny")
    source["conn"].fail_migrate = True
    with pytest.raises(VMError, match="runs on here"):
        here.migrate("VM1", incoming)
    assert here.power_state("VM1") == "on" and here.list() == ["VM1"]
    assert there.abort_incoming("VM1") == "removed"
    assert there.list() == [] and list(target["virtman"].folder.iterdir()) == []
    assert there.abort_incoming("VM1") == "removed"  # again: nothing to do


def test_prepare_refuses_a_known_guest_and_a_failed_snapshot_leaves_no_record(nodes) -> None:
    _, target = nodes
    there = deployed(target, "VM1")
    with pytest.raises(GuestExists):
        there.prepare_incoming("VM1", 1, 128, "tiny")
    target["virtman"].fail_create = "2:no paths"
    with pytest.raises(VirtmanError, match="no paths"):
        there.prepare_incoming("VM2", 1, 128, "tiny")
    assert there.list() == ["VM1"]


def test_a_restart_undoes_an_incoming_guest_that_never_arrived(nodes) -> None:
    _, target = nodes
    target["make"]().prepare_incoming("VM1", 1, 128, "tiny")
    restarted = target["make"]()
    restarted.adopt()
    assert restarted.list() == [] and list(target["virtman"].folder.iterdir()) == []


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (None, "incoming"),
        ({"disk": "/x"}, "incoming"),
        ({**dict.fromkeys(INCOMING_KEYS, "/p"), "disk": ""}, "incoming.disk"),
        ({**dict.fromkeys(INCOMING_KEYS, "/p"), "console": "rel/path"}, "incoming.console"),
        ({**dict.fromkeys(INCOMING_KEYS, "/p"), "host": 7}, "incoming.host"),
    ],
)
def test_a_bad_incoming_is_refused_before_libvirt_is_asked(nodes, bad, field) -> None:
    source, _ = nodes
    here = _running(source)
    with pytest.raises(InvalidInput, match=field):
        here.migrate("VM1", bad)
    assert "migrate3" not in source["conn"].domains["vmt-guest-VM1"].calls


def test_differing_name_prefixes_are_refused(nodes) -> None:
    source, target = nodes
    here = _running(source)
    incoming = {**target["make"]().prepare_incoming("VM1", 1, 128, "tiny"), "domain": "vmt-x"}
    with pytest.raises(GuestStateError, match="guest_name_prefix differ"):
        here.migrate("VM1", incoming)
    assert here.power_state("VM1") == "on"


def test_destination_xml_swaps_only_the_destination_paths() -> None:
    xml = (
        "<domain><name>vmt-g</name><os><kernel>/a/k</kernel><initrd>/a/i</initrd></os>"
        "<devices><disk type='file'><source file='/a/d.qcow2'/><target dev='vda'/></disk>"
        "<serial type='file'><source path='/a/c.log'/></serial>"
        "<console type='file'><source path='/a/c.log'/></console></devices></domain>"
    )
    plan = migration.Incoming("vmt-g", "/b/d.qcow2", "/b/c.log", "/b/k", "/b/i", "u", "h")
    root = ET.fromstring(migration.destination_xml(xml, "/a/d.qcow2", plan))
    assert root.find("devices/disk/source").get("file") == "/b/d.qcow2"
    assert {e.get("path") for e in root.iter("source") if e.get("path")} == {"/b/c.log"}
    assert (root.findtext("os/kernel"), root.findtext("os/initrd")) == ("/b/k", "/b/i")
    with pytest.raises(InvalidInput, match="not a disk"):
        migration.destination_xml(xml, "/other.qcow2", plan)


def test_the_watchdog_aborts_a_migration_that_takes_too_long() -> None:
    class Slow:
        aborted = False

        def name(self) -> str:
            return "vmt-slow"

        def abortJob(self) -> None:
            Slow.aborted = True

    done = migration.threading.Event()
    migration._abort_after(Slow(), done, 0.01)  # type: ignore[arg-type]
    assert Slow.aborted
    Slow.aborted = False
    done.set()
    migration._abort_after(Slow(), done, 5)  # type: ignore[arg-type]
    assert not Slow.aborted
    assert libvirt.VIR_MIGRATE_NON_SHARED_INC & migration.FLAGS
    assert not libvirt.VIR_MIGRATE_NON_SHARED_DISK & migration.FLAGS  # only the overlay
