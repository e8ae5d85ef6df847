"""A fake guest manager implementing ``virtman.zvm.backend.GuestBackend`` in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtman.capture import CaptureExists
from virtman.errors import GuestExists, GuestNotFound, GuestStateError, InvalidInput
from virtman.imageservice import ImageService


@dataclass
class FakeGuest:
    vcpus: int
    memory_mb: int
    disk_gb: int
    image: str | None = None
    state: str = "off"
    console: list[str] = field(default_factory=list)


class FakeGuests:
    def __init__(self) -> None:
        self.guests: dict[str, FakeGuest] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.capture_service: ImageService | None = None
        self.nics: dict[str, list[dict[str, Any]]] = {}

    def _get(self, userid: str) -> FakeGuest:
        if userid not in self.guests:
            raise GuestNotFound(userid)
        return self.guests[userid]

    def _deployed(self, userid: str) -> FakeGuest:
        guest = self._get(userid)
        if guest.image is None:
            raise GuestStateError(userid, "no disk deployed yet (deploy an image first)")
        return guest

    def capture(self, userid: str, image: str) -> dict[str, Any]:
        """As the real one (pause, ``Virtman.capture_image``, unpause): writes
        ``<first image_dir>/volume-<image>.raw`` (the guest's 1 MiB "disk") and exports it
        with ``capture_service``."""
        guest = self._deployed(userid)
        target = f"volume-{image}"
        service = self.capture_service
        if service is None:
            raise RuntimeError("FakeGuests.capture_service is not set")
        path = Path(service.image_dirs[0]) / f"{target}.raw"
        if path.exists() or target in service.list_image_target():
            raise CaptureExists(target, "taken")
        path.write_bytes(b"\x02" * (1 << 20))
        result = service.create_image_target(target, str(path))
        assert result.startswith("0:"), result
        self.calls.append(("capture", userid, image))
        return {
            "source_image": guest.image and f"volume-{guest.image}",
            "target": target,
            "path": str(path),
            "size": 1 << 20,
            "connection": {"target_portal": "127.0.0.1:3260", "target_iqn": target},
        }

    def list(self) -> list[str]:
        return sorted(self.guests)

    def create(self, userid: str, *, vcpus: int, memory_mb: int, disk_gb: int = 0) -> None:
        if userid != userid.upper():
            raise InvalidInput("userid", userid, "must be upper case")
        if userid in self.guests:
            raise GuestExists(userid)
        self.calls.append(("create", userid, vcpus, memory_mb, disk_gb))
        self.guests[userid] = FakeGuest(vcpus, memory_mb, disk_gb)

    def deploy(self, userid: str, image: str) -> None:
        self._get(userid).image = image
        self.calls.append(("deploy", userid, image))

    def start(self, userid: str) -> None:
        guest = self._deployed(userid)
        guest.state = "on"
        guest.console.append(f"{userid} booted from {guest.image}")
        self.calls.append(("start", userid))

    def stop(self, userid: str) -> None:
        self._get(userid).state = "off"
        self.calls.append(("stop", userid))

    def softstop(
        self, userid: str, *, timeout_s: float = 300.0, poll_interval_s: float = 10.0
    ) -> None:
        self._get(userid).state = "off"
        self.calls.append(("softstop", userid, timeout_s, poll_interval_s))

    def pause(self, userid: str) -> None:
        guest = self._deployed(userid)
        if guest.state != "on":
            raise GuestStateError(userid, "not in active status")
        guest.state = "paused"
        self.calls.append(("pause", userid))

    def unpause(self, userid: str) -> None:
        guest = self._deployed(userid)
        if guest.state != "paused":
            raise GuestStateError(userid, "not paused")
        guest.state = "on"
        self.calls.append(("unpause", userid))

    def reboot(self, userid: str) -> None:
        self._deployed(userid).console.append("reboot")
        self.calls.append(("reboot", userid))

    def reset(self, userid: str) -> None:
        self._deployed(userid).console.append("reset")
        self.calls.append(("reset", userid))

    def set_nics(self, userid: str, nics: list[dict[str, Any]], *, live: bool = False) -> None:
        self._get(userid)
        self.calls.append(("set_nics", userid, [n["vdev"] for n in nics], live))
        self.nics[userid] = nics

    def power_state(self, userid: str) -> str:
        return self._get(userid).state

    def info(self, userid: str) -> dict[str, Any]:
        guest = self._get(userid)
        return {
            "power_state": guest.state,
            "max_mem_kb": guest.memory_mb * 1024,
            "mem_kb": guest.memory_mb * 1024 if guest.state != "off" else 0,
            "num_cpu": guest.vcpus,
            "cpu_time_us": 1234 if guest.state != "off" else 0,
        }

    def definition(self, userid: str) -> str:
        guest = self._get(userid)
        name = f"guest-{userid.lower()}"
        return (
            f"<domain type='qemu'>\n  <name>{name}</name>\n  <vcpu>{guest.vcpus}</vcpu>\n</domain>"
        )

    def stats(self, userid: str) -> dict[str, Any]:
        self._get(userid)
        return {
            "cpu": {"cpu_time": 1},
            "mem": {"actual": 1},
            "nics": [{"vdev": "1000", "rx_bytes": 10, "tx_bytes": 20}],
        }

    def console_output(self, userid: str) -> str:
        return "\n".join(self._get(userid).console)

    def delete(self, userid: str) -> None:
        self._get(userid)
        del self.guests[userid]
        self.calls.append(("delete", userid))

    def host_info(self) -> dict[str, Any]:
        return {
            "hypervisor_hostname": "node1",
            "hypervisor_type": "kvm",
            "hypervisor_version": 6001,
            "vcpus": 2,
            "vcpus_used": sum(g.vcpus for g in self.guests.values() if g.state != "off"),
            "memory_mb": 4096,
            "memory_mb_used": 0,
            "disk_total": 10,
            "disk_used": 1,
            "disk_available": 9,
            "cpu_info": {"architecture": "x86_64", "cec_model": "none"},
            "ipl_time": "IPL at 12/06/26 00:00:00 UTC",
        }
