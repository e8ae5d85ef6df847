"""A realistic guest for the benchmarks: Debian bookworm minbase with systemd, booted with the
same Debian cloud kernel and initramfs as the tiny guest (``guestimage.py``).

It boots to ``multi-user.target`` (udev coldplug with the kernel's modules, journald,
getty), then a oneshot unit prints the same marker line as the tiny guest (``VMT-BOOTED
host=… id=… sha=<sha256 of /etc/vmt/blob> uptime=…``) and powers off (``vmt.stay`` on the
kernel command line keeps it up). Measured on this kind of machine (shared/reference/
env-vm-boot.md): a ~16 s boot under TCG that reads ~34 MiB of a 1 GiB image.

The root image is cached in ``<cache_dir>/debian-<key>/`` (``key``: a hash of the package
versions, the include list and this file's text). A cold build runs debootstrap (~45 s and a
few hundred MB from the Debian mirror); a cached one takes milliseconds.

Usage: ``python vmt-demo/debianguest.py --out DIR`` prints the paths as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import guestimage  # noqa: E402

from brick.exception import NotFound  # noqa: E402
from brick.executor import execute  # noqa: E402
from guestkit import apt  # noqa: E402

LOG = logging.getLogger(__name__)

SUITE = "bookworm"
INCLUDE = "systemd-sysv,udev,kmod,procps,iproute2,ifupdown,util-linux"
IMAGE_SIZE = "1G"

MARKER_SCRIPT = """#!/bin/sh
# vmt debian guest: prove the disk was read (id + sha256 of a 1 MiB file), then power off.
sum=$(sha256sum /etc/vmt/blob)
read up idle < /proc/uptime
echo "VMT-BOOTED host=$(hostname) id=$(cat /etc/vmt/id) sha=${sum%% *} uptime=$up" > /dev/ttyS0
grep -qw vmt.stay /proc/cmdline && exit 0
systemctl --no-block poweroff
"""

MARKER_UNIT = """[Unit]
Description=VMT boot marker (prints VMT-BOOTED on ttyS0, then powers off)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmt-marker

[Install]
WantedBy=multi-user.target
"""


def cache_key(kernel_package: str) -> str:
    inputs = json.dumps(
        {"kernel": kernel_package, "suite": SUITE, "include": INCLUDE, "size": IMAGE_SIZE},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(inputs + b"\0" + Path(__file__).read_bytes()).hexdigest()


def build_debian_guest(cache_dir: Path | str) -> guestimage.GuestImage:
    """The Debian guest: from the cache, or built with debootstrap and cached."""
    cache_dir = Path(cache_dir).absolute()
    tiny = guestimage.build_guest(cache_dir)
    key = cache_key(tiny.kernel_package)
    entry = cache_dir / f"debian-{key[:32]}"
    manifest_path = entry / "manifest.json"
    if not manifest_path.is_file():
        _build(cache_dir, entry, key, tiny)
    manifest = json.loads(manifest_path.read_text())
    return dataclasses.replace(
        tiny,
        rootfs=entry / "rootfs.img",
        key=key,
        image_id=manifest["image_id"],
        blob_sha256=manifest["blob_sha256"],
    )


def _build(cache_dir: Path, entry: Path, key: str, tiny: guestimage.GuestImage) -> None:
    work = Path(tempfile.mkdtemp(prefix=".build-debian-", dir=cache_dir))
    try:
        root = work / "root"
        LOG.info("debootstrap %s from %s (about a minute)", SUITE, apt.mirror())
        execute(
            ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(root),
             apt.mirror()],
            timeout_s=1800,
        )  # fmt: skip
        for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin"):
            for path in root.glob(pattern):
                path.unlink()
        _install_modules(work, root, tiny.kernel_package)
        image_id = key[:32]
        blob = random.Random(image_id).randbytes(guestimage.BLOB_SIZE)
        (root / "etc/hostname").write_text(guestimage.HOSTNAME + "\n")
        (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 0\n")
        (root / "etc/vmt").mkdir()
        (root / "etc/vmt/id").write_text(image_id + "\n")
        (root / "etc/vmt/blob").write_bytes(blob)
        script = root / "usr/local/sbin/vmt-marker"
        script.write_text(MARKER_SCRIPT)
        script.chmod(0o755)
        unit = root / "etc/systemd/system/vmt-marker.service"
        unit.write_text(MARKER_UNIT)
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "vmt-marker.service").symlink_to("/etc/systemd/system/vmt-marker.service")
        staged = work / "entry"
        staged.mkdir()
        execute(
            ["mkfs.ext4", "-q", "-F", "-L", "vmt-debian", "-d", str(root),
             "-E", "lazy_itable_init=0,lazy_journal_init=0", str(staged / "rootfs.img"),
             IMAGE_SIZE],
            timeout_s=600,
        )  # fmt: skip
        manifest = {
            "key": key,
            "kernel_package": tiny.kernel_package,
            "image_id": image_id,
            "blob_sha256": hashlib.sha256(blob).hexdigest(),
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(entry, ignore_errors=True)
        staged.rename(entry)
        for old in cache_dir.glob("debian-*"):
            if old != entry and re.fullmatch(r"debian-[0-9a-f]{32}", old.name):
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    LOG.info("built the Debian guest %s", entry)


def _install_modules(work: Path, root: Path, kernel_package: str) -> None:
    """The kernel's modules into the root (udev coldplug loads them as on a real boot)."""
    debs = work / "debs"
    debs.mkdir()
    apt.download([kernel_package], debs)
    tree = work / "kernel"
    for deb in debs.glob("*.deb"):
        execute(["dpkg", "-x", str(deb), str(tree)], timeout_s=300)
    moddirs = sorted((tree / "lib/modules").glob("*"))
    if len(moddirs) != 1:
        raise NotFound("module folder in", kernel_package)
    target = root / "usr/lib/modules" / moddirs[0].name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(moddirs[0], target, symlinks=True)
    execute(["chroot", str(root), "depmod", moddirs[0].name], timeout_s=300)  # kmod of the guest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the cache folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    image = build_debian_guest(args.out)
    json.dump({k: str(v) for k, v in dataclasses.asdict(image).items()}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
