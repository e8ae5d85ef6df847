"""The qemu snapshot layer: create or adopt an identical overlay; a different one is a
Conflict and stays (only teardown deletes a VM's disk)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from brick.executor import Result
from tests.unit.fakes.settings import settings
from virtman.drivers.qemu import driver as qemu
from virtman.errors import Conflict
from virtman.layers.base import Device, SnapshotSpec

pytestmark = pytest.mark.unit

ORIGIN = Device("vmtcor", "/run/vmt/exports/img.raw", 1 << 30)


@pytest.fixture
def layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> qemu.QemuSnapshot:
    """The layer with ``qemu-img`` faked: ``create`` writes a file recording its backing
    file, ``info`` reads it back."""

    def execute(argv: Sequence[str], **_: object) -> Result:
        if argv[:2] == ["qemu-img", "create"]:
            Path(argv[-1]).write_text(argv[argv.index("-b") + 1])
            return Result("", "", 0)
        assert argv[:2] == ["qemu-img", "info"] and "-U" in argv
        backing = Path(argv[-1]).read_text()
        info = {"format": "qcow2", "virtual-size": 1 << 30, "backing-filename": backing}
        return Result(json.dumps(info), "", 0)

    monkeypatch.setattr(qemu, "execute", execute)
    snapshot = qemu.QemuSnapshot.__new__(qemu.QemuSnapshot)
    conf = settings(tmp_path)
    conf.instances_dir.mkdir(parents=True)
    snapshot.d = type("D", (), {"settings": conf})()  # type: ignore[assignment]
    return snapshot


def test_ensure_creates_then_adopts_the_identical_overlay(layer: qemu.QemuSnapshot) -> None:
    assert layer.inspect("vm1") is None
    made = layer.ensure(SnapshotSpec("vm1", ORIGIN))
    path = Path(made.path)
    path.write_text(ORIGIN.path)  # same backing: the same disk (its data must stay)
    before = path.stat().st_mtime_ns
    assert layer.ensure(SnapshotSpec("vm1", ORIGIN)) == made
    assert path.stat().st_mtime_ns == before  # not overwritten
    assert layer.inspect("vm1") == Device("vm1", made.path, 1 << 30)
    assert layer.list_owned() == ["vm1"]


def test_a_different_overlay_is_a_conflict_and_stays(layer: qemu.QemuSnapshot) -> None:
    made = layer.ensure(SnapshotSpec("vm1", ORIGIN))
    other = Device("vmtcor2", "/run/vmt/exports/other.raw", 1 << 30)
    with pytest.raises(Conflict, match="not an overlay of"):
        layer.ensure(SnapshotSpec("vm1", other))
    with pytest.raises(Conflict, match="1073741824 bytes"):
        layer.ensure(SnapshotSpec("vm1", replace(ORIGIN, size=1 << 29)))  # same file, other size
    assert Path(made.path).read_text() == ORIGIN.path  # untouched
    layer.teardown("vm1")  # only an explicit teardown deletes it
    layer.teardown("vm1")
    assert layer.list_owned() == [] and not Path(made.path).exists()
