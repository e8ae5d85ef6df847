"""Block-stack drivers, chosen once from the configuration (``driver``)."""

from __future__ import annotations

from virtman.conf import Settings
from virtman.layers.base import Driver


def load_driver(name: str, settings: Settings) -> Driver:
    if name == "qemu":
        from virtman.drivers.qemu.driver import QemuDriver

        return QemuDriver(settings)
    if name == "dm":
        from virtman.drivers.dm.driver import DmDriver

        return DmDriver(settings)
    raise ValueError(f"unknown driver {name!r} (known: qemu, dm)")
