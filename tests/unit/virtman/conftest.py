"""Fixtures of the tests that run virtman's qemu driver on a fake QMP (see
tests/unit/fakes/qmp.py): qemu-img answers from a FakeExecute (making the file it is asked
for), tgtd is a FakeTgt, qemu-storage-daemon a stand-in process whose QMP socket is the
fake's."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

import brick.qsd.graph
from tests.unit.fakes.execute import FakeExecute
from tests.unit.fakes.qmp import FakeQMP, stand_in
from tests.unit.fakes.settings import settings as make_settings
from tests.unit.fakes.tgt import FakeTgt
from virtman.drivers.qemu.driver import QemuDriver


@pytest.fixture
def qmp(tmp_path: Path) -> Iterator[FakeQMP]:
    server = FakeQMP(tmp_path / "fake.qmp")
    yield server
    server.close()


@pytest.fixture
def qemu_img(monkeypatch: pytest.MonkeyPatch) -> FakeExecute:
    """qemu-img: makes the cache file it is asked for."""
    fake = FakeExecute()

    def run(argv: list[str], **kw: object) -> object:
        if argv[:2] == ["qemu-img", "create"]:
            Path(argv[-2]).touch()
        return fake(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(brick.qsd.graph, "execute", run)
    return fake


@pytest.fixture
def qemu_driver(
    tmp_path: Path, qmp: FakeQMP, qemu_img: FakeExecute, monkeypatch: pytest.MonkeyPatch
) -> Iterator[QemuDriver]:
    """A QemuDriver whose daemon runs (the stand-in) with its NBD server; its ``start``
    starts qemu-storage-daemon only (tgtd is a FakeTgt)."""
    for key, value in stand_in(tmp_path / "bin", qmp.path).items():
        monkeypatch.setenv(key, value)
    conf = dataclasses.replace(make_settings(tmp_path / "node"), qemu_fuse_readahead_kib=0)
    made = QemuDriver(conf)
    made.tgt = FakeTgt()  # type: ignore[assignment]
    made.qsd.start(timeout_s=10)
    made.qsd.start_nbd_server(made.host, conf.nbd_port)
    monkeypatch.setattr(made, "start", lambda: made.qsd.start(timeout_s=10))
    qmp.clear()
    yield made
    made.qsd.stop()  # ends the stand-in by its PID
