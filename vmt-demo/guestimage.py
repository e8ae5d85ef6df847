#!/usr/bin/env python3
"""A tiny bootable guest built from Debian packages, cached: kernel, initramfs, root image.

- kernel: ``boot/vmlinuz-*`` of the package ``linux-image-cloud-amd64`` depends on (the
  concrete ``linux-image-6.1.0-N-cloud-amd64``), fetched with ``apt-get download`` and
  unpacked with ``dpkg -x``. In that flavour virtio_pci and virtio_blk are modules and ext4
  is built in, so the guest needs an initramfs.
- initramfs (``initrd.cpio.gz``, ~1 MB): ``busybox-static``'s busybox (also a downloaded
  package, not the host's) and the module chain of virtio_pci + virtio_blk, in dependency
  order read from each module's ``.modinfo`` ``depends=`` (no kmod needed). Written here as
  cpio newc + gzip, with ``/dev/console`` as a device node (no mknod, no root needed).
  Its ``/init`` loads the modules, mounts ``root=`` (ro unless ``rw``) and switch_roots.
- root image (``rootfs.img``, ext4, 64 MiB, ~11 MiB allocated): busybox, ``/etc/hostname``,
  ``/etc/vmt/id`` (an id this builder writes), ``/etc/vmt/blob`` (1 MiB of bytes derived from
  the id) and ``/sbin/init``, which prints on the serial console::

      VMT-BOOTED host=<hostname> id=<cat /etc/vmt/id> sha=<sha256 of /etc/vmt/blob> uptime=<s>

  and powers off, or stays up if the kernel command line has ``vmt.stay``. The ``id`` and
  ``sha`` prove that the guest read its disk. With ``rw vmt.write=N`` it then writes N MiB
  (N numbered copies of the blob) to ``/vmt-written`` (``VMT-WROTE mib=N sha=<sha256>``)
  and stays up, printing ``VMT-TICK n=<i>`` every second and, every 8th, ``VMT-CHECK n=<i>
  sha=<sha256>`` of the file read again from its disk (page cache dropped): a migrated
  guest shows it runs on, on its new disk. A guest that cannot mount its root prints
  ``VMT-FAIL ...`` and powers off.

The artifacts live in ``<cache_dir>/<key>/``, ``key`` a hash of the package versions and of
this file's text, so a rebuilt guest follows any change to either. The package versions
(``apt-cache`` takes ~0.8 s a call here) are themselves cached against the apt lists' file
stamps, so a cached run takes milliseconds. Builds are atomic (a temporary folder renamed),
so concurrent builders are safe; other keys' folders are removed after a build.

Usage: ``python vmt-demo/guestimage.py --out DIR`` prints the paths and the expected marker
as JSON. Needs apt-get, dpkg and mkfs.ext4 (e2fsprogs >= 1.43 for ``-d``), and network access
to the Debian mirror for a cold build.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from brick.exception import NotFound
from brick.executor import execute
from guestkit import apt

LOG = logging.getLogger(__name__)

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
MODULES = ("virtio_pci", "virtio_blk")  # loaded in the initramfs, with their dependencies
ROOTFS_MIB = 64
BLOB_SIZE = 1 << 20
HOSTNAME = "vmt-guest"
MARKER = "VMT-BOOTED"
FAIL_MARKER = "VMT-FAIL"
CMDLINE = "root=/dev/vda console=ttyS0 ro panic=-1"  # vmt.stay: keep the guest running
FORMAT = 1  # of the cache folder

INIT_RAMFS = """#!/bin/busybox sh
# vmt initramfs: load the virtio block modules, mount root= and switch_root to init=.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /lib/modules/order); do
  $B insmod /lib/modules/$m || echo "vmt-initrd: insmod $m failed"
done
root=/dev/vda mode=ro init=/sbin/init
for a in $($B cat /proc/cmdline); do
  case $a in root=*) root=${a#root=};; rw) mode=rw;; ro) mode=ro;; init=*) init=${a#init=};; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 500 ]; do $B sleep 0.02; i=$((i+1)); done
if ! $B mount -t ext4 -o $mode "$root" /newroot; then
  echo "VMT-FAIL cannot mount $root"
  $B poweroff -f
fi
$B mount --move /dev /newroot/dev
$B umount /sys /proc
exec $B switch_root /newroot "$init"
"""

INIT_ROOTFS = """#!/bin/busybox sh
# vmt tiny guest: prove the disk was read (id + sha256 of a 1 MiB file), then power off.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B hostname -F /etc/hostname
sum=$($B sha256sum /etc/vmt/blob)
read up idle < /proc/uptime
echo "VMT-BOOTED host=$($B hostname) id=$($B cat /etc/vmt/id) sha=${sum%% *} uptime=$up"
for a in $($B cat /proc/cmdline); do
  case $a in vmt.write=*)  # (needs rw) N MiB of new data on the disk, then ticks
    i=0
    while [ $i -lt ${a#vmt.write=} ]; do  # cheap under TCG, unlike /dev/urandom
      echo "vmt chunk $i"
      $B cat /etc/vmt/blob
      i=$((i+1))
    done > /vmt-written
    $B sync
    sum=$($B sha256sum /vmt-written)
    echo "VMT-WROTE mib=${a#vmt.write=} sha=${sum%% *}"
    n=0
    while :; do  # alive; every 8th tick re-read from the disk, not the page cache
      $B sleep 1
      n=$((n+1))
      echo "VMT-TICK n=$n"
      if [ $((n % 8)) = 0 ]; then
        echo 3 > /proc/sys/vm/drop_caches
        sum=$($B sha256sum /vmt-written)
        echo "VMT-CHECK n=$n sha=${sum%% *}"
      fi
    done ;;
  esac
done
case " $($B cat /proc/cmdline) " in
  *" vmt.stay "*) while :; do $B sleep 3600; done ;;
esac
$B poweroff -f
"""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot ``kernel`` + ``initrd`` with ``cmdline`` on a copy or an overlay
    of ``rootfs`` (raw ext4) as the first virtio disk."""

    kernel: Path
    initrd: Path
    rootfs: Path
    key: str
    kernel_package: str
    hostname: str
    image_id: str
    blob_sha256: str
    cmdline: str = CMDLINE

    @property
    def expected_marker(self) -> str:
        """The start of the marker line this guest prints (``uptime=`` follows)."""
        return f"{MARKER} host={self.hostname} id={self.image_id} sha={self.blob_sha256}"

    def marker_matches(self, fields: dict[str, str]) -> bool:
        """Whether a parsed marker (``parse_marker``) is this image's."""
        return (fields.get("host"), fields.get("id"), fields.get("sha")) == (
            self.hostname,
            self.image_id,
            self.blob_sha256,
        )


def parse_marker(console: str) -> dict[str, str] | None:
    """The ``key=value`` fields of the first complete marker line in ``console``, or None."""
    for line in console.splitlines(keepends=True):
        start = line.find(MARKER + " ")
        if start >= 0 and line.endswith("\n"):
            words = line[start + len(MARKER) :].split()
            return dict(w.split("=", 1) for w in words if "=" in w)
    return None


# -- commands ----------------------------------------------------------------------------------
def resolve_packages(cache_dir: Path) -> dict[str, str]:
    """``{package: version}`` of the concrete kernel package and busybox-static (candidates),
    plus ``"kernel"``: the kernel package's name. Cached in ``cache_dir/packages.json``."""
    stamp = apt.lists_stamp()
    cached = cache_dir / "packages.json"
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(cached.read_text())
        if saved.get("stamp") == stamp:
            return dict(saved["packages"])
    shown = apt.show([KERNEL_META, BUSYBOX])
    depends = shown[KERNEL_META].get("Depends", "")
    match = re.search(r"\b(linux-image-[0-9][A-Za-z0-9.+-]*-cloud-amd64)\b", depends)
    if not match:
        raise NotFound(f"kernel package in Depends of {KERNEL_META}", depends)
    kernel = match.group(1)
    packages = {
        "kernel": kernel,
        kernel: apt.show([kernel])[kernel]["Version"],
        BUSYBOX: shown[BUSYBOX]["Version"],
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".packages.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "packages": packages}, indent=1))
    os.replace(tmp, cached)
    return packages


# -- kernel modules ------------------------------------------------------------------------------
def modinfo(ko: bytes) -> list[tuple[str, str]]:
    """The ``key=value`` pairs of a kernel module's ``.modinfo`` section (ELF64 LE)."""
    if ko[:4] != b"\x7fELF" or ko[4:6] != b"\x02\x01":
        raise ValueError("not a little-endian ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + index * shentsize
        )
        return name, offset, size

    _, str_offset, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if ko[str_offset + name : ko.index(b"\0", str_offset + name)] == b".modinfo":
            items = ko[offset : offset + size].split(b"\0")
            return [
                (k.decode(), v.decode())
                for k, _, v in (item.partition(b"=") for item in items if b"=" in item)
            ]
    return []


def module_chain(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files to load for ``wanted`` (built-in ones skipped), dependencies first."""
    files = {p.name.removesuffix(".ko").replace("-", "_"): p for p in moddir.rglob("*.ko")}
    builtin_file = moddir / "modules.builtin"
    builtin = {
        Path(line).name.removesuffix(".ko").replace("-", "_")
        for line in (builtin_file.read_text().split() if builtin_file.exists() else [])
    }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise NotFound("kernel module", f"{name} in {moddir}")
        deps = [v for k, v in modinfo(files[name].read_bytes()) if k == "depends"]
        for dep in ",".join(deps).split(","):
            if dep:
                visit(dep.replace("-", "_"))
        order.append(files[name])

    for name in wanted:
        visit(name)
    return order


# -- cpio newc -------------------------------------------------------------------------------
class Cpio:
    """A cpio archive in the ``newc`` format the kernel unpacks (all owned by root, mtime 0)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        self._out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._out.write(b"\0" * (-self._out.tell() % 4) + data)
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def build_initrd(busybox: Path, modules: Sequence[Path]) -> bytes:
    """The gzip'ed initramfs: busybox, ``/init`` and ``modules`` in load order."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", INIT_RAMFS.encode(), 0o755)
    for ko in modules:
        cpio.file(f"lib/modules/{ko.name}", ko.read_bytes())
    cpio.file("lib/modules/order", "".join(f"{ko.name}\n" for ko in modules).encode())
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


def build_rootfs(busybox: Path, out: Path, image_id: str, blob: bytes, staging: Path) -> None:
    """The ext4 root image ``out`` (``ROOTFS_MIB``), made with ``mkfs.ext4 -d staging``."""
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc/vmt"):
        (staging / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, staging / "bin/busybox")
    (staging / "sbin/init").write_text(INIT_ROOTFS)
    (staging / "sbin/init").chmod(0o755)
    (staging / "etc/hostname").write_text(HOSTNAME + "\n")
    (staging / "etc/vmt/id").write_text(image_id + "\n")
    (staging / "etc/vmt/blob").write_bytes(blob)
    uuid = (
        f"{image_id[:8]}-{image_id[8:12]}-4{image_id[13:16]}-8{image_id[17:20]}-{image_id[20:32]}"
    )
    execute(
        [
            "mkfs.ext4", "-q", "-F", "-L", "vmt-guest", "-U", uuid, "-d", str(staging),
            "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            str(out), f"{ROOTFS_MIB}M",
        ],
        timeout_s=120,
    )  # fmt: skip


# -- the cache -------------------------------------------------------------------------------
def cache_key(packages: dict[str, str]) -> str:
    """The hash of everything the artifacts are made of: package versions and this file."""
    text = Path(__file__).read_bytes()
    inputs = json.dumps({"format": FORMAT, "packages": packages}, sort_keys=True).encode()
    return hashlib.sha256(inputs + b"\0" + text).hexdigest()


def _image(entry: Path, manifest: dict[str, str]) -> GuestImage:
    return GuestImage(
        kernel=entry / "vmlinuz",
        initrd=entry / "initrd.cpio.gz",
        rootfs=entry / "rootfs.img",
        key=manifest["key"],
        kernel_package=manifest["kernel_package"],
        hostname=manifest["hostname"],
        image_id=manifest["image_id"],
        blob_sha256=manifest["blob_sha256"],
        cmdline=manifest["cmdline"],
    )


def cached_guest(cache_dir: Path, key: str) -> GuestImage | None:
    """The complete cache entry ``key``, or None."""
    entry = cache_dir / key
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = _image(entry, manifest)
    if manifest.get("key") != key or not all(
        p.is_file() for p in (image.kernel, image.initrd, image.rootfs)
    ):
        return None
    return image


def build_guest(cache_dir: Path | str, *, prune: bool = True) -> GuestImage:
    """The guest for today's package versions: from the cache, or built (~5 s) and cached.

    Raises ``CommandFailed`` if a download or tool fails, ``NotFound`` if a package, the
    kernel or a module is missing.
    """
    cache_dir = Path(cache_dir).absolute()
    packages = resolve_packages(cache_dir)
    key = cache_key(packages)
    image = cached_guest(cache_dir, key)
    if image is not None:
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    kernel_pkg = packages["kernel"]
    work = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=cache_dir))
    try:
        entry = work / "entry"
        entry.mkdir()
        debs = work / "debs"
        debs.mkdir()
        apt.download(
            [f"{kernel_pkg}={packages[kernel_pkg]}", f"{BUSYBOX}={packages[BUSYBOX]}"], debs
        )
        tree = work / "tree"
        for deb in sorted(debs.glob("*.deb")):
            execute(["dpkg", "-x", str(deb), str(tree)], timeout_s=300)
        busybox = tree / "bin/busybox"
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        moddirs = sorted((tree / "lib/modules").glob("*"))
        if not busybox.is_file() or len(vmlinuz) != 1 or len(moddirs) != 1:
            raise NotFound(
                "kernel or busybox in the packages", ", ".join(p.name for p in debs.glob("*"))
            )
        shutil.copyfile(vmlinuz[0], entry / "vmlinuz")
        chain = module_chain(moddirs[0], MODULES)
        (entry / "initrd.cpio.gz").write_bytes(build_initrd(busybox, chain))
        image_id = key[:32]
        blob = random.Random(image_id).randbytes(BLOB_SIZE)
        build_rootfs(busybox, entry / "rootfs.img", image_id, blob, work / "rootfs")
        manifest = {
            "key": key,
            "kernel_package": f"{kernel_pkg}={packages[kernel_pkg]}",
            "busybox_package": f"{BUSYBOX}={packages[BUSYBOX]}",
            "modules": " ".join(ko.name for ko in chain),
            "hostname": HOSTNAME,
            "image_id": image_id,
            "blob_sha256": hashlib.sha256(blob).hexdigest(),
            "cmdline": CMDLINE,
        }
        (entry / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            entry.rename(cache_dir / key)
        except OSError:
            if cached_guest(cache_dir, key) is None:  # not a concurrent builder's: a real error
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if prune:
        _prune(cache_dir, keep=key)
    image = cached_guest(cache_dir, key)
    if image is None:
        raise NotFound("guest cache entry", str(cache_dir / key))
    LOG.info("built guest %s (%s)", key[:12], manifest["kernel_package"])
    return image


def _prune(cache_dir: Path, keep: str) -> None:
    """Remove the other keys' entries (only folders that look like ours)."""
    for entry in cache_dir.iterdir():
        if entry.name != keep and re.fullmatch(r"[0-9a-f]{64}", entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the cache folder")
    parser.add_argument("--keep-old", action="store_true", help="keep other keys' entries")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    image = build_guest(args.out, prune=not args.keep_old)
    shown = {k: str(v) for k, v in asdict(image).items()}
    shown["expected_marker"] = image.expected_marker
    json.dump(shown, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
