"""Real VMs for functional tests: libvirt daemons, the tiny cached guest, booted domains.

Import the fixtures into a test module (``from tests.functional.vmfixtures import ...``):

- ``libvirt_daemons`` (session): virtlogd + libvirtd on ``qemu:///system``, started (or adopted
  from a killed run or shared with another session: the run folder is fixed) and stopped by
  PID at the end of the last session using it (``shared``: one running at the same time, e.g.
  another checkout's or CI's, keeps it); a daemon that already answered and is not ours is
  used and left running. It makes ``/dev/kvm``
  ``root:kvm 0660`` if it is not usable by libvirt's QEMU user: otherwise libvirt re-probes
  QEMU on every call and a boot takes ~50 s instead of ~1 s (brick/libvirtd.py).
- ``guest_image`` (session): ``vmt-demo/guestimage.py``'s guest, cached in ``.work/guest-cache``
  of the checkout (or ``$VMT_GUEST_CACHE``): ~5 s cold, milliseconds after.
- ``vm_factory``: ``vm_factory.boot(instance, disk, console_log, cmdline_extra="")`` boots the
  guest on ``disk`` through ``virtman.guest.domains.VirtualMachines`` (``vm_factory.vms``);
  every domain it booted is destroyed at the end, with libvirt's log of it.

``make_overlay`` and ``wait_for_marker`` are the helpers the tests use with them. libvirt
missing is an error, never a skip: ``import libvirt`` fails the collection.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from brick.exception import Timeout
from brick.executor import execute
from brick.libvirtd import LibvirtDaemons
from brick.wait import wait_until
from virtman.guest.domains import VirtualMachines, VMInfo

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "vmt-demo"))

from guestimage import FAIL_MARKER, GuestImage, build_guest, parse_marker  # noqa: E402

LIBVIRT_RUN = Path("/run/vmt-test-libvirt")  # fixed: a killed run's daemons are adopted
GUEST_CACHE = Path(os.environ.get("VMT_GUEST_CACHE", REPO / ".work" / "guest-cache"))
QEMU_LOGS = Path("/var/log/libvirt/qemu")
TOOLS = ("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "apt-get", "dpkg")
BOOT_TIMEOUT_S = 120.0  # the tiny guest needs ~4 s under TCG; 4 at once on 2 cores ~7 s


def unique_instance(label: str) -> str:
    """An instance name no other test run uses."""
    return f"t{os.getpid()}-{secrets.token_hex(3)}-{label}"


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"({path}: {err.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def make_overlay(backing: Path, overlay: Path, backing_format: str = "raw") -> Path:
    """A qcow2 overlay of ``backing`` (whose format is recorded in the header)."""
    execute(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
         str(overlay)],
        timeout_s=30,
    )  # fmt: skip
    return overlay


@pytest.fixture(scope="session")
def libvirt_daemons() -> Iterator[LibvirtDaemons]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: run tools/setup.sh (libvirt-daemon-system, ...)"
    # shared: other sessions (other checkouts, CI) use the same libvirtd; the last one out
    # stops it. The folder stays: its lock file is what they queue on.
    daemons = LibvirtDaemons(LIBVIRT_RUN, fix_kvm_device=True, shared=True)
    daemons.start()
    try:
        yield daemons
    finally:
        daemons.stop()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest(GUEST_CACHE)


@dataclass
class VMFactory:
    """Boots the test guest and destroys, at the end, every domain it booted."""

    vms: VirtualMachines
    guest: GuestImage
    booted: list[str] = field(default_factory=list)

    def boot(self, instance: str, disk: Path, console_log: Path, cmdline_extra: str = "") -> VMInfo:
        self.booted.append(instance)
        return self.vms.boot(
            instance,
            disk,
            kernel=self.guest.kernel,
            initrd=self.guest.initrd,
            cmdline=f"{self.guest.cmdline} {cmdline_extra}".strip(),
            console_log=console_log,
        )

    def cleanup(self) -> None:
        errors = []
        for instance in self.booted:
            try:
                self.vms.destroy(instance)
            except Exception as err:  # destroy the others, then report
                errors.append(f"{instance}: {err}")
            (QEMU_LOGS / f"{self.vms.domain_name(instance)}.log").unlink(missing_ok=True)
        self.vms.close()
        assert not errors, f"destroy failed: {errors}"


@pytest.fixture
def vm_factory(libvirt_daemons: LibvirtDaemons, guest_image: GuestImage) -> Iterator[VMFactory]:
    factory = VMFactory(VirtualMachines(libvirt_daemons.uri), guest_image)
    try:
        yield factory
    finally:
        factory.cleanup()


def wait_for_marker(
    vms: VirtualMachines, instance: str, console_log: Path, timeout_s: float = BOOT_TIMEOUT_S
) -> dict[str, str]:
    """The marker's fields once the guest prints them. Fails at once, with the console's
    tail, if the guest reports a failure, panics or stops without a marker."""

    def outcome() -> tuple[str, dict[str, str] | None] | None:
        text = console_log.read_text(errors="replace") if console_log.exists() else ""
        fields = parse_marker(text)
        if fields is not None:
            return "booted", fields
        if FAIL_MARKER in text or "Kernel panic" in text:
            return "failed", None
        if not vms.info(instance).active:
            fields = parse_marker(console_log.read_text(errors="replace"))
            return ("booted", fields) if fields else ("stopped without a marker", None)
        return None

    domain = vms.domain_name(instance)
    try:
        result, fields = wait_until(
            outcome, timeout_s=timeout_s, what=f"{domain}'s marker", max_interval_s=0.1
        )
    except Timeout:
        result, fields = f"no marker within {timeout_s:g} s", None
    if fields is None:
        pytest.fail(
            f"{domain}: {result}; console {console_log}:\n{tail(console_log)}\n"
            f"libvirt's log:\n{tail(QEMU_LOGS / f'{domain}.log', 10)}"
        )
    return fields


def wait_until_off(vms: VirtualMachines, instance: str, timeout_s: float = 30.0) -> VMInfo:
    """The instance's info once it is no longer running."""

    def stopped() -> VMInfo | None:
        info = vms.info(instance)
        return None if info.active else info

    return wait_until(stopped, timeout_s=timeout_s, what=f"{instance} to power off")


def domain_gone(uri: str, domain: str) -> bool:
    """Whether libvirt itself (not virtman) knows no domain ``domain``."""
    conn = libvirt.open(uri)
    try:
        conn.lookupByName(domain)
    except libvirt.libvirtError as err:
        return err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    finally:
        conn.close()
    return False
