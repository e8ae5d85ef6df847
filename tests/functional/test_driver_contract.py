"""The layer contract (tests/functional/guestside/contract.py) against the ``qemu`` driver,
for real: an image server's tgtd on 127.0.0.1, the node's qemu-storage-daemon and tgtd.

The same cases run against the ``dm`` driver inside a guest of
tests/functional/test_dm_guests.py (``test_the_layer_contract_holds_on_the_dm_driver``);
both parametrise over ``contract.CASES``. Every daemon is stopped by PID at the end;
nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from brick.executor import execute
from brick.tgt import TgtDaemon
from tests.functional.clusterfixtures import TGT_BASE, write_image
from tests.functional.guestside import contract
from tests.functional.voltproc import free_port
from virtman.conf import Settings
from virtman.drivers.qemu.driver import QemuDriver
from virtman.errors import Conflict
from virtman.layers.base import Device, Endpoint, SnapshotSpec

pytestmark = pytest.mark.functional

IMAGE = "volume-contract"
IQN = f"iqn.2010-10.org.openstack:{IMAGE}"
IMAGE_MIB = 8
# tgtd control ports: next to test_qemu_cold_path's (base + 80, 81), below virtmanproc's
SERVER_TGT_PORT = TGT_BASE + 82
NODE_TGT_PORT = TGT_BASE + 83


@pytest.fixture(scope="module")
def qemu_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[contract.Rig]:
    tmp = tmp_path_factory.mktemp("contract")
    image = tmp / "image.raw"
    sha = write_image(image, IMAGE_MIB)
    server = TgtDaemon(SERVER_TGT_PORT, [f"127.0.0.1:{free_port()}"], run_dir=tmp / "tgt")
    server.start()
    state = tmp / "node" / "state"
    settings = Settings(
        host_ip="127.0.0.2",
        master_url="http://127.0.0.1:1",
        master_token=None,
        heartbeat_interval=1.0,
        state_dir=state,
        cache_dir=state / "cache",
        instances_dir=state / "instances",
        run_dir=tmp / "node" / "run",
        iscsi_port=free_port(),
        nbd_port=0,
        tgt_control_port=NODE_TGT_PORT,
    )
    driver = QemuDriver(settings)

    def disk_sha(disk: Device) -> str:
        raw = tmp / "disk.raw"
        execute(
            ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", disk.path, str(raw)],
            timeout_s=120,
        )
        try:
            return contract.file_sha(str(raw))
        finally:
            raw.unlink()

    try:
        server.adm.create_target(IQN, image)
        driver.start()
        yield contract.Rig(
            driver, IMAGE, (Endpoint(server.portals[0], IQN, 1),), IQN, sha, disk_sha
        )
    finally:
        errors: list[Exception] = []
        for stop in (
            lambda: driver.qsd.stop(timeout_s=5),
            lambda: [driver.tgt.delete_target(t.iqn) for t in driver.tgt.targets()],
            driver.tgtd.stop,
            lambda: [server.adm.delete_target(t.iqn) for t in server.adm.targets()],
            server.stop,
        ):
            try:
                stop()
            except Exception as exc:  # stop the others too
                errors.append(exc)
        assert not errors, errors


@pytest.fixture(scope="module")
def qemu_outcome(qemu_rig: contract.Rig) -> dict[str, str]:
    """Every case's outcome, from one pass over one build (as on the dm guest)."""
    return contract.run_all(qemu_rig)


@pytest.mark.parametrize("case", sorted(contract.CASES))
def test_the_layer_contract_holds_on_the_qemu_driver(
    qemu_outcome: dict[str, str], case: str
) -> None:
    assert qemu_outcome[case] == "ok", qemu_outcome


def test_a_conflicting_disk_stays_as_it_was(qemu_rig: contract.Rig) -> None:
    """qemu only: the refused overlay keeps its bytes on disk (its file is untouched)."""
    built = contract.build(qemu_rig)
    try:
        disk = Path(built.disk.path)
        before = (disk.stat().st_mtime_ns, disk.read_bytes())
        with pytest.raises(Conflict):
            qemu_rig.driver.snapshot.ensure(
                SnapshotSpec(qemu_rig.instance, replace(built.origin, path="/nowhere"))
            )
        assert (disk.stat().st_mtime_ns, disk.read_bytes()) == before
    finally:
        contract.teardown(qemu_rig)
