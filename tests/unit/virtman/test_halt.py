"""virtman-halt: at shutdown the node's daemons stop whatever they serve; otherwise they stay."""

from __future__ import annotations

from pathlib import Path

from brick.exception import CommandFailed
from virtman.cmd.halt import halt
from virtman.drivers.qemu.driver import QemuDriver
from virtman.layers.base import Driver


class FakeTgtd:
    def __init__(self, fail: bool = False) -> None:
        self.stops = 0
        self.fail = fail

    def stop(self) -> None:
        self.stops += 1
        if self.fail:
            raise CommandFailed(["tgtadm"], 1, "tgtd: refused")


def test_qemu_halt_stops_tgtd_and_the_storage_daemon_even_with_targets(
    qemu_driver: QemuDriver,
) -> None:
    qemu_driver.tgt.create_target("iqn.2010-10.org.test:img", Path("/x.raw"), lun=1)
    assert qemu_driver.tgt.targets()  # stop() would keep tgtd for them; halt() does not
    tgtd = FakeTgtd()
    qemu_driver.tgtd = tgtd  # type: ignore[assignment]
    assert qemu_driver.qsd.running()
    qemu_driver.halt()
    assert tgtd.stops == 1
    assert not qemu_driver.qsd.running()


def test_at_shutdown_it_acts_only_while_the_system_stops(qemu_driver: QemuDriver) -> None:
    built: list[Driver] = []

    def driver() -> Driver:
        built.append(qemu_driver)
        return qemu_driver

    tgtd = FakeTgtd()
    qemu_driver.tgtd = tgtd  # type: ignore[assignment]
    assert halt(at_shutdown=True, stopping=lambda: False, driver=driver) == 0
    assert built == [] and tgtd.stops == 0 and qemu_driver.qsd.running()
    assert halt(at_shutdown=True, stopping=lambda: True, driver=driver) == 0
    assert tgtd.stops == 1 and not qemu_driver.qsd.running()


def test_a_failed_tgtd_stop_still_stops_the_storage_daemon_and_exits_1(
    qemu_driver: QemuDriver,
) -> None:
    qemu_driver.tgtd = FakeTgtd(fail=True)  # type: ignore[assignment]
    assert halt(at_shutdown=False, stopping=lambda: False, driver=lambda: qemu_driver) == 1
    assert not qemu_driver.qsd.running()
