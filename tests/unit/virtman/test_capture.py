"""``Virtman.capture``: an instance's disk flattened into a new image this node exports
(the flattening command faked: it copies the disk; the functional test runs qemu-img)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from brick.exception import BrickError, CommandFailed
from tests.unit.fakes.driver import FakeDriver
from tests.unit.fakes.settings import CONN, settings
from tests.unit.fakes.volt import FakeVolt
from tests.unit.virtman.test_imageservice import FakeTgt
from virtman import capture as capturing
from virtman.compute import Virtman
from virtman.imageservice import ImageService
from virtman.journal import Journal

PREFIX = "iqn.2010-10.org.openstack:"


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    images = tmp_path / "images"
    images.mkdir()
    disk = tmp_path / "vm1-disk"
    disk.write_bytes(b"\x07" * 8192)  # what the flattened disk holds
    virtman = Virtman(
        settings=settings(tmp_path / "state"),
        driver=FakeDriver(),  # type: ignore[arg-type]
        volt=FakeVolt(),  # type: ignore[arg-type]
        heartbeat=False,
    )
    tgt = FakeTgt()
    service = ImageService(tgt, None, PREFIX, [images], journal=Journal(tmp_path / "j.json"))  # type: ignore[arg-type]
    virtman.image_service = service
    ran: list[list[str]] = []
    hooks: dict[str, Any] = {}

    def convert(argv: list[str], **_: Any) -> None:
        ran.append(list(argv))
        if "during" in hooks:
            hooks["during"]()
        if "fail" in hooks:
            raise CommandFailed(argv, 1, "qemu-img: broken")
        Path(argv[-1]).write_bytes(disk.read_bytes())

    monkeypatch.setattr(capturing, "execute", convert)
    assert virtman.create("vm1", "img", CONN).startswith("0:")
    return SimpleNamespace(
        virtman=virtman, tgt=tgt, service=service, images=images, ran=ran, hooks=hooks
    )


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_capture_flattens_exports_and_leaves_the_instance_alone(node: SimpleNamespace) -> None:
    result = node.virtman.capture("vm1", "snap")
    new = node.images / "volume-snap.raw"
    assert result == f"0:{new}"
    [argv] = node.ran
    # read without taking the disk's lock (the caller paused the guest), its format given
    assert argv[:2] == ["qemu-img", "convert"] and "-U" in argv
    assert argv[argv.index("-f") + 1] == "qcow2" and argv[argv.index("-O") + 1] == "raw"
    assert argv[-2] == "/fake/instances/vm1.qcow2"
    assert new.read_bytes() == b"\x07" * 8192
    assert stat.S_IMODE(new.stat().st_mode) == 0o444  # immutable once registered
    assert files(node.images) == ["volume-snap.raw"]  # no partial file left
    assert node.tgt.created == [(PREFIX + "volume-snap", new)]
    assert node.service.journal.exports()["volume-snap"]["path"] == str(new)
    # the instance keeps its disk and its image
    assert node.virtman.list() == ["vm1:volume-img"]
    assert node.virtman.driver.state.snapshots == {"vm1": "/fake/instances/vm1.qcow2"}
    # the structured form: this node is the new image's source
    node.virtman.image_service = node.service
    captured = node.virtman.capture_image("vm1", "snap2")
    assert captured.source_image == "volume-img"
    assert captured.connection == {
        "target_portal": "10.0.0.9:3260",
        "target_iqn": PREFIX + "volume-snap2",
        "target_lun": 1,
    }
    assert captured.size == 8192


def test_a_taken_name_is_a_clear_warning_and_changes_nothing(node: SimpleNamespace) -> None:
    assert node.virtman.capture("vm1", "snap").startswith("0:")
    before = (files(node.images), list(node.tgt.created))
    result = node.virtman.capture("vm1", "volume-snap")  # the same target name
    assert result.startswith("1:") and "volume-snap" in result
    # a file of that name (not exported)
    (node.images / "volume-other.raw").write_bytes(b"x" * 512)
    result = node.virtman.capture("vm1", "other")
    assert result.startswith("1:") and "never overwritten" in result
    assert (node.images / "volume-other.raw").read_bytes() == b"x" * 512
    # the name of an image this node runs instances on
    assert node.virtman.capture("vm1", "img").startswith("1:")
    assert (files(node.images), node.tgt.created) == (
        sorted([*before[0], "volume-other.raw"]),
        before[1],
    )
    assert len(node.ran) == 1  # refused before reading anything


def test_failures_leave_nothing(node: SimpleNamespace) -> None:
    node.hooks["fail"] = True
    result = node.virtman.capture("vm1", "snap")
    assert result.startswith("2:") and "broken" in result
    assert files(node.images) == [] and node.tgt.created == []
    del node.hooks["fail"]

    def refuse(*_: Any, **__: Any) -> int:
        raise BrickError("tgtd said no")

    node.tgt.create_target = refuse
    result = node.virtman.capture("vm1", "snap")
    assert result.startswith("2:") and "tgtd said no" in result
    assert files(node.images) == [] and node.service.journal.exports() == {}
    assert node.virtman.list() == ["vm1:volume-img"]
    # the name is free again
    del node.tgt.create_target
    assert node.virtman.capture("vm1", "snap").startswith("0:")


def test_bad_input_and_unknown_instances(node: SimpleNamespace) -> None:
    assert node.virtman.capture("nobody", "snap").startswith("1:")
    assert node.virtman.capture("vm1", "../x").startswith("2:")
    assert node.virtman.capture("../vm1", "x").startswith("2:")
    assert node.ran == [] and files(node.images) == []
    node.virtman.image_service = None
    assert "no image service" in node.virtman.capture("vm1", "snap")


def test_the_instance_cannot_be_destroyed_while_captured(node: SimpleNamespace) -> None:
    answers: list[str] = []
    node.hooks["during"] = lambda: answers.append(node.virtman.destroy("vm1"))
    assert node.virtman.capture("vm1", "snap").startswith("0:")
    assert answers[0].startswith("2:") and "being captured" in answers[0]
    assert node.virtman.destroy("vm1") == "0:"
    # the captured image outlives its instance
    assert (node.images / "volume-snap.raw").exists()


def test_a_crashed_captures_partial_file_is_swept(node: SimpleNamespace) -> None:
    (node.images / ".volume-snap.raw.part").write_bytes(b"half")
    (node.images / "keep.raw").write_bytes(b"k" * 512)
    assert capturing.sweep_partials(node.service) == [str(node.images / ".volume-snap.raw.part")]
    assert files(node.images) == ["keep.raw"]
