"""Build the kernel-test guest from Debian packages, and cache it.

What is built (``build_guest``), into ``<cache_dir>/base-<key>/``:

- ``vmlinuz``: the Debian cloud kernel, the concrete ``linux-image-6.1.0-N-cloud-amd64`` that
  ``linux-image-cloud-amd64`` depends on (``apt-get download`` + ``dpkg -x``).
- ``initrd.gz``: a busybox initramfs (``guest/initramfs-init``) with the virtio_pci and
  virtio_blk module chain (ext4 is built in); it mounts ``/dev/vda`` and runs
  ``/sbin/guestkit-init`` (``guest/guestkit-init``, the guest's PID 1).
- ``rootfs.img``: a sparse ext4 image of ``debootstrap --variant=minbase bookworm`` with
  ``PACKAGES`` (``multipath-tools`` on request), every module of the kernel in
  ``/lib/modules/<version>``, and a venv ``/opt/vmt/venv`` (``--system-site-packages``, so
  Debian's rtslib-fb is importable) holding the project's pinned ``requirements.txt``.
  The venv's ``guestkit-project.pth`` puts ``/ci/project`` on ``sys.path``: the project's own
  code is *not* in the image but comes on the payload disk of every run (``guestkit.payload``),
  so a code change never rebuilds the image.

The requirements are installed from wheels made on this host with ``pip wheel`` (cached in
``<cache_dir>/wheels-<hash>/``, the dependencies pinned to the host venv's versions): the
guest and this host are both Debian 12 with Python 3.11, and it spares the image a compiler
and libvirt-dev for libvirt-python's sdist. Inside the chroot ``pip install --no-index``
installs them, so the chroot needs no network.

The debootstrap tree is its own cached layer (``<cache_dir>/rootfs-<hash>/``, keyed only by
debootstrap's command line and the package versions; see ``debootstrap_layer``), so a change
of the requirements or of a later build step costs ~20-30 s, not a new debootstrap. Its .debs
are kept in ``<cache_dir>/debs/`` (only the versions of the last build) for the next one.

The cache key is a hash of the candidate versions of the kernel and of every listed package
(``apt-cache``, re-read only when the apt lists change), the mirror, the package list, the
text of this file and of the two guest scripts, and the requirements file. A hit costs a few
milliseconds. Builds run under a file lock into a temporary folder that is renamed into place,
so concurrent builders are safe; only the ``keep`` most recently used images stay.

Needs root, debootstrap, apt-get, dpkg, chroot, mkfs.ext4 and the Debian mirror (and the
package index pip uses, for the wheels) on a cold build.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from brick.exception import BrickError, CommandFailed, NotFound
from brick.executor import execute
from guestkit import apt

LOG = logging.getLogger(__name__)
T = TypeVar("T")

CHECKOUT = Path(__file__).resolve().parents[1]
GUEST_FILES = Path(__file__).resolve().parent / "guest"
DEFAULT_CACHE_DIR = CHECKOUT / ".work" / "guestkit"
CACHE_ENV = "GUESTKIT_CACHE"
SUITE = "bookworm"
KERNEL_META = "linux-image-cloud-amd64"
PACKAGES = (
    "open-iscsi",
    "dmsetup",
    "tgt",
    "python3",
    "python3-venv",
    "python3-rtslib-fb",
    "e2fsprogs",
    "util-linux",
    "kmod",
    "udev",
    "iproute2",
    "procps",
    "busybox-static",  # the initramfs's busybox; nc for signals between guests
    "libvirt0",  # so that the pinned libvirt-python imports (virtman.guest.domains)
    # the qemu driver, for runs that mix it with dm nodes: qemu-storage-daemon, its
    # iSCSI block driver (libiscsi), qemu-img/qemu-io, FUSE exports
    "qemu-system-common",
    "qemu-block-extra",
    "qemu-utils",
    "fuse3",
)
MULTIPATH_TOOLS = "multipath-tools"
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
VENV = "/opt/vmt/venv"
STAGE = "/opt/vmt/build"  # in the image, while the venv is installed; removed after
PROJECT_DIR = "/ci/project"  # where the payload puts the project's packages
IMAGE_MIB = 2048
FORMAT = 1
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
KEY_FILES = (
    Path(__file__).resolve(),
    GUEST_FILES / "initramfs-init",
    GUEST_FILES / "guestkit-init",
)


@dataclass(frozen=True)
class Guest:
    """A built guest: boot ``kernel`` + ``initrd`` with ``rootfs`` (raw ext4) as ``/dev/vda``.

    Attach ``rootfs`` with ``snapshot=on``: any number of guests share it and it stays pristine.
    """

    kernel: Path
    initrd: Path
    rootfs: Path
    key: str
    kernel_version: str
    manifest: Path
    venv_python: str = f"{VENV}/bin/python"

    def info(self) -> dict[str, Any]:
        """The build manifest: package versions installed in the image, sizes, timings."""
        return dict(json.loads(self.manifest.read_text()))


def default_cache_dir() -> Path:
    """``$GUESTKIT_CACHE``, else ``<checkout>/.work/guestkit``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


# -- apt: mirror, versions ------------------------------------------------------------------
def resolve_versions(cache_dir: Path, packages: Sequence[str]) -> dict[str, str]:
    """``{package: candidate version}`` for ``packages`` and the concrete kernel package, plus
    ``"kernel"``: that package's name. Cached in ``cache_dir/packages.json`` per apt stamp."""
    stamp, query = apt.lists_stamp(), sorted(set(packages))
    saved_path = cache_dir / "packages.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads(saved_path.read_text())
        if saved["stamp"] == stamp and saved["query"] == query:
            return dict(saved["versions"])
    shown = apt.show([KERNEL_META, *query])
    depends = shown[KERNEL_META].get("Depends", "")
    match = re.search(r"\b(linux-image-[0-9][A-Za-z0-9.+-]*-cloud-amd64)\b", depends)
    if not match:
        raise NotFound(f"kernel package in the Depends of {KERNEL_META}", depends)
    kernel = match.group(1)
    versions = {name: shown[name]["Version"] for name in query}
    versions[kernel] = apt.show([kernel])[kernel]["Version"]
    versions["kernel"] = kernel
    _write_json(saved_path, {"stamp": stamp, "query": query, "versions": versions})
    return versions


# -- the cache key --------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_key(
    versions: dict[str, str], packages: Sequence[str], mirror: str, requirements: Path
) -> str:
    """The hash of everything the image is made of (see the module docstring)."""
    inputs = {
        "format": FORMAT,
        "suite": SUITE,
        "mirror": mirror,
        "packages": sorted(set(packages)),
        "versions": versions,
        "initrd_modules": INITRD_MODULES,
        "image_mib": IMAGE_MIB,
        "python": list(sys.version_info[:2]),
        "requirements": _sha256_file(requirements),
        "files": {p.name: _sha256_file(p) for p in KEY_FILES},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _cached(entry: Path, key: str) -> Guest | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    guest = Guest(
        kernel=entry / "vmlinuz",
        initrd=entry / "initrd.gz",
        rootfs=entry / "rootfs.img",
        key=key,
        kernel_version=str(manifest.get("kernel_version", "")),
        manifest=entry / "manifest.json",
    )
    if manifest.get("key") != key or not all(
        p.is_file() for p in (guest.kernel, guest.initrd, guest.rootfs)
    ):
        return None
    return guest


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prune(cache_dir: Path, prefix: str, keep: int, current: Path) -> None:
    """Keep the ``keep`` most recently used ``<prefix><hex>`` folders (``current`` always)."""
    entries = [
        p
        for p in cache_dir.iterdir()
        if p.is_dir() and re.fullmatch(re.escape(prefix) + r"[0-9a-f]{16,64}", p.name)
    ]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in entries if p != current][max(keep - 1, 0) :]:
        LOG.info("guestkit: removing old cache entry %s", old.name)
        shutil.rmtree(old, ignore_errors=True)


# -- safe paths and cleanup -----------------------------------------------------------------
def _path_in(root: Path, guest_path: str) -> Path:
    """Host path of ``guest_path`` inside the tree ``root``; symlinks resolved, never outside."""
    root = root.resolve()
    path = root / guest_path.lstrip("/")
    parent = path.parent.resolve()
    if parent != root and root not in parent.parents:
        raise BrickError(f"{guest_path} resolves outside {root}: {parent}")
    return parent / path.name


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """``rm -rf path``, after unmounting what a failed debootstrap left mounted inside it."""
    if not path.exists():
        return
    for point in _mounts_under(path):
        LOG.warning("guestkit: unmounting leftover %s", point)
        execute(["umount", "-l", point], check_exit_code=False)
    if _mounts_under(path):
        raise BrickError(f"{path} still has mounts inside; not removing it")
    shutil.rmtree(path)


# -- build steps ----------------------------------------------------------------------------
def _timed(timings: dict[str, float], step: str, fn: Callable[[], T]) -> T:
    started = time.monotonic()
    try:
        return fn()
    finally:
        timings[step] = round(time.monotonic() - started, 2)
        LOG.info("guestkit build: %s took %.1f s", step, timings[step])


def wheelhouse(cache_dir: Path, requirements: Path, host_python: str) -> Path:
    """Wheels of ``requirements`` and their dependencies, made by ``host_python -m pip wheel``;
    cached in ``cache_dir/wheels-<hash>/``."""
    digest = hashlib.sha256(requirements.read_bytes())
    digest.update(f"{sys.version_info[:2]}:{os.uname().machine}".encode())
    out = cache_dir / f"wheels-{digest.hexdigest()[:16]}"
    if (out / ".complete").is_file():
        os.utime(out)
        return out
    tmp = Path(tempfile.mkdtemp(prefix=".wheels-", dir=cache_dir))
    try:
        argv = [host_python, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
        argv += ["-w", str(tmp), "-r", str(requirements)]
        # the host venv's versions of the dependencies too, so that both run the same code
        freeze = execute([host_python, "-m", "pip", "freeze", "--exclude-editable"]).stdout
        pins = [line for line in freeze.splitlines() if re.fullmatch(r"[\w.-]+==[\w.+!-]+", line)]
        (tmp / "constraints.txt").write_text("".join(f"{pin}\n" for pin in pins))
        try:
            execute([*argv, "-c", str(tmp / "constraints.txt")], timeout_s=1800)
        except CommandFailed as exc:
            LOG.warning("guestkit: pip wheel with the host's pins failed (%s); without them", exc)
            execute(argv, timeout_s=1800)
        (tmp / ".complete").write_text(requirements.read_text())
        _remove_tree(out)
        tmp.rename(out)
    finally:
        _remove_tree(tmp)
    _prune(cache_dir, "wheels-", 2, out)
    return out


def _fetch_kernel(work: Path, package: str, version: str) -> tuple[Path, Path]:
    """Download and unpack the kernel package: (vmlinuz, its modules folder)."""
    debs, tree = work / "kernel-deb", work / "kernel"
    debs.mkdir()
    apt.download([f"{package}={version}"], debs)
    for deb in sorted(debs.glob("*.deb")):
        execute(["dpkg", "-x", str(deb), str(tree)], timeout_s=300)
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    moddirs = sorted((tree / "lib/modules").glob("*"))
    if len(vmlinuz) != 1 or len(moddirs) != 1:
        raise NotFound("vmlinuz and modules in", package)
    return vmlinuz[0], moddirs[0]


def _debootstrap_argv(packages: Sequence[str], mirror: str) -> list[str]:
    """debootstrap's command line, without the target folder and the .deb cache."""
    include = f"--include={','.join(packages)}"
    return ["debootstrap", "--variant=minbase", include, SUITE, "{root}", mirror]


def debootstrap_layer(
    cache_dir: Path, packages: Sequence[str], versions: dict[str, str], mirror: str
) -> Path:
    """The debootstrap tree (``<layer>/root``), cached in ``cache_dir/rootfs-<hash>/``.

    Its key is only debootstrap's command line and the packages' versions, so a change of
    the requirements or of the later build steps reuses it (a copy takes ~3 s, debootstrap
    ~50-100 s). Never modified after it is made: builds copy it. .debs are kept in
    ``cache_dir/debs`` for the next debootstrap.
    """
    argv = _debootstrap_argv(packages, mirror)
    inputs = {"argv": argv, "versions": {p: versions[p] for p in sorted(set(packages))}}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    out = cache_dir / f"rootfs-{key[:16]}"
    if (out / ".complete").is_file():
        os.utime(out)
        return out
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=cache_dir))
    try:
        root = tmp / "root"
        full = [a.replace("{root}", str(root)) for a in argv]
        full.insert(3, f"--cache-dir={debs}")
        try:
            result = execute(full, timeout_s=1800)
        except CommandFailed as exc:
            inner = root / "debootstrap" / "debootstrap.log"
            failure_log = cache_dir / "build-failed.log"
            failure_log.write_text(exc.stderr + (inner.read_text() if inner.is_file() else ""))
            exc.add_note(f"debootstrap's log: {failure_log}")
            raise
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in _path_in(root, junk).glob("*"):
                if path.is_file():
                    path.unlink()
        (tmp / "debootstrap.log").write_text(result.stdout + result.stderr)
        (tmp / ".complete").write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")
        _remove_tree(out)
        tmp.rename(out)
    finally:
        _remove_tree(tmp)
    _prune(cache_dir, "rootfs-", 2, out)
    return out


def _prune_debs(debs: Path, installed: dict[str, str]) -> None:
    """Remove cached .debs of versions the image no longer has."""
    wanted = {f"{name}_{version.replace(':', '%3a')}_" for name, version in installed.items()}
    for deb in debs.glob("*.deb"):
        if not any(deb.name.startswith(w) for w in wanted):
            deb.unlink()


def _chroot(root: Path, argv: Sequence[str], timeout_s: float = 600) -> str:
    return execute(["chroot", str(root), *argv], env=CHROOT_ENV, timeout_s=timeout_s).stdout


def _install_kernel_modules(root: Path, moddir: Path) -> str:
    """Copy every module of the kernel into the image and run depmod there; the version."""
    version = moddir.name
    target = _path_in(root, f"/lib/modules/{version}")
    shutil.copytree(moddir, target, symlinks=True)
    _chroot(root, ["depmod", "-a", version])
    return version


def _install_venv(root: Path, wheels: Path, requirements: Path) -> None:
    """The venv with the pinned requirements, from the host-built wheels, offline."""
    shutil.copytree(
        wheels, _path_in(root, f"{STAGE}/wheels"), ignore=shutil.ignore_patterns(".complete")
    )
    shutil.copyfile(requirements, _path_in(root, f"{STAGE}/requirements.txt"))
    _chroot(root, ["python3", "-m", "venv", "--system-site-packages", VENV], timeout_s=300)
    pip = [f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pip += ["--no-index", "--no-cache-dir", "--find-links", f"{STAGE}/wheels"]
    _chroot(root, [*pip, "-r", f"{STAGE}/requirements.txt"], timeout_s=900)
    site = sorted(_path_in(root, VENV).glob("lib/python3*/site-packages"))
    if len(site) != 1:
        raise NotFound("site-packages in the guest venv", VENV)
    (site[0] / "guestkit-project.pth").write_text(PROJECT_DIR + "\n")
    _chroot(root, [f"{VENV}/bin/python", "-c", "import oslo_config, libvirt, rtslib_fb"])
    shutil.rmtree(_path_in(root, STAGE))


def _install_init(root: Path) -> None:
    init = _path_in(root, "/sbin/guestkit-init")
    shutil.copyfile(GUEST_FILES / "guestkit-init", init)
    init.chmod(0o755)
    _path_in(root, "/etc/hostname").write_text("guest\n")
    _path_in(root, "/etc/hosts").write_text("127.0.0.1 localhost\n")
    _path_in(root, "/ci").mkdir(exist_ok=True)


class Cpio:
    """A ``newc`` cpio archive as the kernel unpacks it (owner root, mtime 0)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inode = 0

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        self._inode += 1
        raw = name.encode() + b"\0"
        header = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self._out.write(b"070701" + b"".join(b"%08X" % v for v in header) + raw)
        self._out.write(b"\0" * (-self._out.tell() % 4) + data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._add(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return self._out.getvalue()


def _initrd_modules(root: Path, version: str) -> list[Path]:
    """The ``.ko`` files of ``INITRD_MODULES`` and their dependencies, in load order."""
    order: list[Path] = []
    for module in INITRD_MODULES:
        out = _chroot(root, ["modprobe", "-S", version, "--show-depends", module])
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod":
                ko = _path_in(root, words[1])
                if ko.suffix != ".ko":
                    raise BrickError(f"{ko.name}: busybox insmod needs an uncompressed .ko")
                if ko not in order:
                    order.append(ko)
    return order


def _make_initrd(root: Path, version: str, out: Path) -> list[str]:
    cpio = Cpio()
    for name in ("bin", "dev", "proc", "sys", "newroot", "mods"):
        cpio.directory(name)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", _path_in(root, "/bin/busybox").read_bytes(), 0o755)
    cpio.file("init", (GUEST_FILES / "initramfs-init").read_bytes(), 0o755)
    modules = _initrd_modules(root, version)
    for ko in modules:
        cpio.file(f"mods/{ko.name}", ko.read_bytes())
    cpio.file("mods/order", "".join(f"{ko.name}\n" for ko in modules).encode())
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    return [ko.name for ko in modules]


def _make_image(root: Path, out: Path) -> None:
    mkfs = ["mkfs.ext4", "-q", "-F", "-L", "guestkit", "-d", str(root)]
    mkfs += ["-E", "root_owner=0:0", str(out), f"{IMAGE_MIB}M"]
    execute(mkfs, timeout_s=600)


def _installed_versions(root: Path) -> dict[str, str]:
    out = _chroot(root, ["dpkg-query", "-W", "-f", "${Package} ${Version}\n"])
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _build(entry: Path, work: Path, inputs: Inputs, key: str, wheels: Callable[[], Path]) -> None:
    versions, packages, mirror = inputs.versions, inputs.packages, inputs.mirror
    timings: dict[str, float] = {}
    started = time.monotonic()
    root = work / "rootfs"
    kernel = versions["kernel"]
    with ThreadPoolExecutor(max_workers=2) as pool:  # downloads overlap with debootstrap/copy
        kernel_job = pool.submit(_fetch_kernel, work, kernel, versions[kernel])
        wheels_job = pool.submit(_timed, timings, "wheels", wheels)
        layer = _timed(
            timings,
            "debootstrap",
            lambda: debootstrap_layer(work.parent, packages, versions, mirror),
        )
        copy = ["cp", "-a", "--reflink=auto", str(layer / "root"), str(root)]
        _timed(timings, "copy", lambda: execute(copy, timeout_s=600))
        vmlinuz, moddir = kernel_job.result()
        wheel_dir = wheels_job.result()
    shutil.copyfile(layer / "debootstrap.log", entry / "debootstrap.log")
    shutil.copyfile(vmlinuz, entry / "vmlinuz")
    version = _timed(timings, "modules", lambda: _install_kernel_modules(root, moddir))
    _timed(timings, "venv", lambda: _install_venv(root, wheel_dir, inputs.requirements))
    _install_init(root)
    initrd_modules = _timed(
        timings, "initrd", lambda: _make_initrd(root, version, entry / "initrd.gz")
    )
    installed = _installed_versions(root)
    _prune_debs(work.parent / "debs", installed)
    _timed(timings, "mkfs", lambda: _make_image(root, entry / "rootfs.img"))
    timings["total"] = round(time.monotonic() - started, 2)
    manifest = {
        "key": key,
        "format": FORMAT,
        "kernel_package": f"{kernel}={versions[kernel]}",
        "kernel_version": version,
        "mirror": mirror,
        "packages": sorted(packages),
        "installed": installed,
        "initrd_modules": initrd_modules,
        "venv": VENV,
        "project_dir": PROJECT_DIR,
        "rootfs_allocated_mib": round((entry / "rootfs.img").stat().st_blocks * 512 / 2**20),
        "timings_s": timings,
    }
    _write_json(entry / "manifest.json", manifest)


@dataclass(frozen=True)
class Inputs:
    """What a guest is built from, resolved once: the cache folder (made), the requirements
    file, the Debian mirror, the packages and their versions (``versions["kernel"]`` names
    the kernel package)."""

    cache_dir: Path
    requirements: Path
    mirror: str
    packages: list[str]
    versions: dict[str, str]

    def key(self) -> str:
        """The base guest's key (``base_key``)."""
        return base_key(self.versions, self.packages, self.mirror, self.requirements)


def resolve_inputs(
    cache_dir: Path | str | None, requirements: Path | str, mirror: str | None, packages: list[str]
) -> Inputs:
    """The inputs of a build: defaults filled in (the cache folder, ``GUESTKIT_MIRROR`` or
    the host's mirror), the cache folder made, the packages' versions resolved."""
    cache = Path(cache_dir or default_cache_dir()).absolute()
    requirements = Path(requirements).absolute()
    mirror = mirror or os.environ.get("GUESTKIT_MIRROR") or apt.mirror()
    cache.mkdir(parents=True, exist_ok=True)
    return Inputs(cache, requirements, mirror, packages, resolve_versions(cache, packages))


def build_entry(
    inputs: Inputs, prefix: str, key: str, keep: int, build: Callable[[Path, Path], None]
) -> Guest:
    """The guest of cache entry ``<prefix><key[:16]>`` (see ``cached_build``), marked most
    recently used; the ``<prefix>`` entries beyond the ``keep`` newest are removed."""
    entry = inputs.cache_dir / f"{prefix}{key[:16]}"
    guest = cached_build(inputs.cache_dir, entry, key, build, kernel=inputs.versions["kernel"])
    os.utime(entry)  # most recently used: pruned last
    _prune(inputs.cache_dir, prefix, keep, entry)
    return guest


def cached_build(
    cache_dir: Path,
    entry: Path,
    key: str,
    build: Callable[[Path, Path], None],
    *,
    kernel: str,
) -> Guest:
    """The guest of cache ``entry`` (for ``key``), built by ``build(into, work)`` into a
    temporary folder and renamed into place under the cache's lock if it is missing or
    stale; a concurrent builder's result is taken as is."""
    guest = _cached(entry, key)
    if guest is not None:
        return guest
    for tool in ("debootstrap", "apt-get", "dpkg", "chroot", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise NotFound("build tool", tool)
    with _locked(cache_dir / ".build.lock"):
        guest = _cached(entry, key)  # a concurrent builder may have made it meanwhile
        if guest is not None:
            return guest
        for stale in cache_dir.glob(".*-*"):  # a killed build's temporary folders
            if stale.is_dir() and stale.name.split("-")[0] in (".build", ".rootfs"):
                LOG.warning("guestkit: removing %s, left by a killed build", stale)
                _remove_tree(stale)
        LOG.info("guestkit: building %s (kernel %s)", entry.name, kernel)
        work = Path(tempfile.mkdtemp(prefix=f".build-{key[:16]}-", dir=cache_dir))
        try:
            (work / "entry").mkdir()
            build(work / "entry", work)
            _remove_tree(entry)
            (work / "entry").rename(entry)
        finally:
            _remove_tree(work)
        guest = _cached(entry, key)
        if guest is None:
            raise NotFound("guest cache entry", str(entry))
        LOG.info("guestkit: built %s", entry)
        return guest


def build_guest(
    cache_dir: Path | str | None = None,
    *,
    multipath_tools: bool = False,
    extra_packages: Sequence[str] = (),
    requirements: Path | str = CHECKOUT / "requirements.txt",
    mirror: str | None = None,
    host_python: str = sys.executable,
    keep: int = 2,
) -> Guest:
    """The guest for today's inputs: from the cache (milliseconds) or built (~1-2 min cold).

    ``multipath_tools`` adds multipath-tools, ``extra_packages`` any other Debian packages
    (each variant is its own cache entry). Raises ``NotFound`` for a missing tool or package,
    ``CommandFailed`` if a build step fails (debootstrap's log is named in a note).
    """
    packages = [*PACKAGES, *([MULTIPATH_TOOLS] if multipath_tools else []), *extra_packages]
    packages = sorted(set(packages), key=packages.index)
    inputs = resolve_inputs(cache_dir, requirements, mirror, packages)
    key = inputs.key()
    wheels = partial(wheelhouse, inputs.cache_dir, inputs.requirements, host_python)
    return build_entry(
        inputs, "base-", key, keep, lambda into, work: _build(into, work, inputs, key, wheels)
    )
