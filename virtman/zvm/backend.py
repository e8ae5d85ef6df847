"""The guest manager as the z/VM-shaped API sees it (the agreed interface of issue 12).

``virtman.guest.manager.Guests`` implements it; the API calls nothing else on it. A ``userid``
is 1-8 of ``[A-Za-z0-9]``, upper-cased by the API before any call. Errors: ``GuestNotFound``,
``GuestExists``, ``InvalidInput``, ``GuestStateError`` (``virtman.errors``).
"""

from __future__ import annotations

import builtins
from typing import Any, Protocol


class GuestBackend(Protocol):
    def list(self) -> list[str]:
        """Every userid, sorted."""

    def create(self, userid: str, *, vcpus: int, memory_mb: int, disk_gb: int = 0) -> None:
        """Record a guest (no domain yet)."""

    def deploy(self, userid: str, image: str) -> None:
        """Root disk = a VMThunder snapshot of ``image``; the domain is defined, not started."""

    def start(self, userid: str) -> None: ...

    def stop(self, userid: str) -> None: ...

    def pause(self, userid: str) -> None: ...

    def unpause(self, userid: str) -> None: ...

    def reboot(self, userid: str) -> None: ...

    def reset(self, userid: str) -> None: ...

    def softstop(
        self, userid: str, *, timeout_s: float = 300.0, poll_interval_s: float = 10.0
    ) -> None:
        """ACPI shutdown, wait up to ``timeout_s``, then force off."""

    def capture(self, userid: str, image: str) -> dict[str, Any]:
        """The guest's root disk (base + its writes) flattened into the new base image
        ``volume-<image>`` exported by this node: pause the guest if it runs,
        ``Virtman.capture_image``, unpause it (also on failure); the guest keeps its disk.
        Returns ``Captured.as_dict()``: ``{"target", "path", "size", "connection"}``.
        Name taken: ``virtman.capture.CaptureExists`` (nothing changed); no disk yet:
        ``GuestStateError``."""

    def set_nics(
        self, userid: str, nics: builtins.list[dict[str, Any]], *, live: bool = False
    ) -> None:
        """The guest's NICs become ``nics`` (``[{"vdev", "bridge", "mac_addr"}]``), each on
        a Linux bridge; ``live``: a running guest changes at once too. Nothing changed on
        failure."""

    def power_state(self, userid: str) -> str:
        """``"on"``, ``"off"`` or ``"paused"``."""

    def info(self, userid: str) -> dict[str, Any]:
        """``{"power_state", "max_mem_kb", "mem_kb", "num_cpu", "cpu_time_us"}``."""

    def definition(self, userid: str) -> str:
        """The libvirt domain XML."""

    def stats(self, userid: str) -> dict[str, Any]:
        """``{"cpu": {...}, "mem": {...}, "nics": [...]}``."""

    def console_output(self, userid: str) -> str: ...

    def delete(self, userid: str) -> None:
        """Stop if running, undefine, release the snapshot; unknown: ``GuestNotFound``."""

    def host_info(self) -> dict[str, Any]:
        """The 12 keys of ``host_get_info`` (docs/zvm-api.rst)."""
