"""virtman.guest.domains against real libvirt (QEMU TCG): the tiny Debian-kernel guest boots from a
qcow2 overlay over a root-owned 0400 raw file (what a FUSE export of qemu-storage-daemon
looks like), proves on its console that it read its disk, and leaves nothing behind.

Nothing is faked; libvirt or a tool missing fails the tests.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brick.executor import execute
from tests.functional import vmfixtures
from tests.functional.vmfixtures import (
    domain_gone,
    make_overlay,
    unique_instance,
    wait_for_marker,
    wait_until_off,
)
from virtman.errors import InstanceNotFound
from virtman.guest.domains import InvalidVMInput, VirtualMachines

pytestmark = pytest.mark.functional
libvirt_daemons = vmfixtures.libvirt_daemons
guest_image = vmfixtures.guest_image
vm_factory = vmfixtures.vm_factory


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder removed after the test whatever happens (pytest keeps its tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="vmt-vm-boot-") as folder:
        yield Path(folder)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_only_base(guest, folder: Path) -> Path:
    """A copy of the guest's root image, root-owned and 0400 like a FUSE export."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.raw"
    execute(["cp", "--sparse=always", str(guest.rootfs), str(base)], timeout_s=60)
    base.chmod(0o400)
    return base


def test_boot_reads_its_disk_and_destroy_leaves_nothing(workdir: Path, vm_factory) -> None:
    vms, guest = vm_factory.vms, vm_factory.guest
    # Odd characters in every path this VM has: the domain XML must escape them.
    folder = workdir / 'it\'s <a> & "b"'
    base = read_only_base(guest, folder)
    base_sha = sha256_file(base)
    overlay = make_overlay(base, folder / "overlay.qcow2")
    console = folder / "console.log"
    instance = unique_instance("boot")

    started = time.monotonic()
    info = vm_factory.boot(instance, overlay, console)
    booted_s = time.monotonic() - started
    assert (info.instance, info.domain) == (instance, f"vmt-{instance}")
    assert (info.domain_type, info.disk_path, info.console_log) == ("qemu", overlay, console)
    assert instance in [i.instance for i in vms.list()]

    fields = wait_for_marker(vms, instance, console)
    marker_s = time.monotonic() - started
    assert guest.marker_matches(fields), f"wrong marker {fields}, want {guest.expected_marker}"
    print(
        f"\nboot() returned in {booted_s:.2f} s; marker after {marker_s:.2f} s"
        f" (guest uptime {fields.get('uptime')} s)"
    )

    assert wait_until_off(vms, instance).state == "shutoff"  # the guest powered itself off
    assert sha256_file(base) == base_sha, "the read-only base was written"

    vms.destroy(instance)
    assert domain_gone(vms.uri, f"vmt-{instance}")
    assert [i for i in vms.list() if i.instance == instance] == []
    with pytest.raises(InstanceNotFound):
        vms.info(instance)
    vms.destroy(instance)  # already gone: success


def test_stop_waits_then_destroys_a_guest_that_ignores_acpi(workdir: Path, vm_factory) -> None:
    vms = vm_factory.vms
    base = read_only_base(vm_factory.guest, workdir)
    overlay = make_overlay(base, workdir / "overlay.qcow2")
    console = workdir / "console.log"
    instance = unique_instance("stay")
    vm_factory.boot(instance, overlay, console, cmdline_extra="vmt.stay")
    assert vm_factory.guest.marker_matches(wait_for_marker(vms, instance, console))
    assert vms.info(instance).state == "running"  # vmt.stay: it does not power off

    started = time.monotonic()
    assert vms.stop(instance, timeout_s=1.0) is False  # busybox init has no ACPI handler
    assert time.monotonic() - started < 20
    assert vms.info(instance).state == "shutoff"  # stopped, still defined
    assert vms.stop(instance) is True  # not running: nothing to do

    vms.destroy(instance)
    assert domain_gone(vms.uri, f"vmt-{instance}")


BAD_NAMES = ["", "-x", ".x", "a/b", "a b", "../x", "x\n", "a" * 65, "é", None, 7]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_instance_names_raise_before_libvirt(guest_image, workdir: Path, name) -> None:
    disk = workdir / "disk.qcow2"
    disk.write_bytes(b"")
    # A URI nothing answers: reaching libvirt would raise VMError, not a ValueError.
    vms = VirtualMachines("qemu+unix:///system?socket=/nonexistent/sock")
    with pytest.raises(InvalidVMInput, match="instance_name") as caught:
        vms.boot(
            name,
            disk,
            kernel=guest_image.kernel,
            initrd=guest_image.initrd,
            cmdline=guest_image.cmdline,
            console_log=workdir / "console.log",
        )
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ValueError):
        vms.destroy(name)
    with pytest.raises(ValueError):
        vms.info(name)


def test_bad_paths_and_values_raise_before_anything_is_defined(workdir: Path, vm_factory) -> None:
    vms, guest = vm_factory.vms, vm_factory.guest
    disk = workdir / "disk.qcow2"
    disk.write_bytes(b"")
    good = {
        "kernel": guest.kernel,
        "initrd": guest.initrd,
        "cmdline": guest.cmdline,
        "console_log": workdir / "console.log",
    }
    bad = [
        ("disk_path", {}, "relative/disk.qcow2"),
        ("disk_path", {}, workdir / "missing.qcow2"),
        ("disk_path", {}, workdir),
        ("kernel", {"kernel": "vmlinuz"}, disk),
        ("initrd", {"initrd": workdir / "missing"}, disk),
        ("console_log", {"console_log": "console.log"}, disk),
        ("console_log", {"console_log": workdir / "no-such-dir" / "c.log"}, disk),
        ("console_log", {"console_log": workdir}, disk),
        ("memory_mib", {"memory_mib": 0}, disk),
        ("memory_mib", {"memory_mib": "128"}, disk),
        ("cmdline", {"cmdline": "console=ttyS0\ninit=/bin/sh"}, disk),
        ("disk_format", {"disk_format": "vmdk"}, disk),
    ]
    mine = f"t{os.getpid()}-"
    before = [i for i in vms.list() if i.instance.startswith(mine)]
    for number, (field, override, disk_path) in enumerate(bad):
        instance = unique_instance(f"bad{number}")
        vm_factory.booted.append(instance)  # destroyed at the end, should one slip through
        with pytest.raises(InvalidVMInput, match=field):
            vms.boot(instance, disk_path, **{**good, **override})
        assert domain_gone(vms.uri, f"vmt-{instance}"), f"{field}: a domain was defined"
    assert [i for i in vms.list() if i.instance.startswith(mine)] == before
