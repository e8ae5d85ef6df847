"""The deployment guest (issue 14, Build 3): systemd as init and the project's wheel installed.

``build_deploy_guest(wheel)`` makes ``<cache_dir>/deploy-<key>/`` with the same ``vmlinuz``,
``initrd.gz`` and kinds of files as ``build_guest``, but its root file system is installed
the way ``docs/deploy.rst`` says: Debian's ``systemd``/``systemd-sysv`` on top of the guest
packages, and the wheel in a plain venv ``/opt/vmthunder`` (``python3 -m venv`` then ``pip
install`` of the wheel; its dependencies come offline from the host-built wheelhouse). The
role is *not* prepared in the image: a run's payload runs ``vmt-initenv.py`` on the first boot,
as an operator would, and reboots.

The initramfs hands over to ``/sbin/guestkit-init`` as for every guest; here that is a link to
``/lib/systemd/systemd``. Two units of ``guest/deploy/`` glue a run to systemd:
``guestkit-boot.service`` (before the network is online: node name, addresses, the payload
into ``/ci`` on the first boot) and ``guestkit-check.service`` (runs ``/ci/run.sh`` once the
boot is done; exit 0-99 is the result: ``/ci/out`` goes to the results disk and the guest
powers off; ``REBOOT`` (exit 200) reboots the guest, and ``/ci/run.sh`` runs again after
the next boot with ``CI_boot`` one higher; ``LOSE`` (exit 201) is a machine lost: result 0,
``/ci/out`` on the results disk, then the power goes at once through sysrq, no unit stopped,
no socket closed). Runs need ``run_guests(..., allow_reboot=True)``.

The image also holds Debian's ``postgresql`` (its service disabled: a run enables it on the
one guest that hosts the database) and the wheel's ``[postgresql]`` extra, for runs with
several masters on one database (``docs/ha.rst``).

The key hashes the base guest's inputs (``guestkit.build.base_key``), the wheel's *content*
(names and bytes of its members, not its timestamps), the files of ``guest/deploy/`` and this
file: a code change of the project rebuilds the image (~30 s with the debootstrap layer
cached); a cached image costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
import zipfile
from pathlib import Path

from brick.exception import NotFound
from brick.executor import execute
from guestkit.build import (
    CHECKOUT,
    GUEST_FILES,
    PACKAGES,
    Guest,
    Inputs,
    _chroot,
    _fetch_kernel,
    _install_kernel_modules,
    _installed_versions,
    _make_image,
    _make_initrd,
    _path_in,
    _timed,
    _write_json,
    build_entry,
    debootstrap_layer,
    resolve_inputs,
    wheelhouse,
)

SYSTEMD_PACKAGES = ("systemd", "systemd-sysv")
# PostgreSQL for runs with several masters on one database (docs/ha.rst); its service is
# disabled in the image: the run's database host enables it, as an operator would.
POSTGRESQL_PACKAGES = ("postgresql",)
EXTRAS = "[postgresql]"  # docs/deploy.rst step 2: the master's PostgreSQL driver (psycopg)
VENV = "/opt/vmthunder"
STAGE = "/opt/vmt-stage"
DEPLOY_FILES = GUEST_FILES / "deploy"
UNITS = ("guestkit-boot.service", "guestkit-check.service")
SCRIPT = "guestkit-deploy"
REBOOT = 200  # the exit status of /ci/run.sh that asks for a reboot
LOSE = 201  # the exit status of /ci/run.sh that powers the guest off at once (result 0)
# Units of the Debian packages that cost boot time under TCG and that no run needs: the
# getty (no one logs in), logind (there is no D-Bus), LIO's restore (rtslib-fb), iSCSI's
# logins to stored nodes, the pstore archiver and the timers. tgt.service stays: disabling
# it is vmt-initenv.py's job.
MASKED = (
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "systemd-logind.service",
    "rtslib-fb-targetctl.service",
    "open-iscsi.service",
    "e2scrub_reap.service",
    "systemd-pstore.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)


def wheel_digest(wheel: Path) -> str:
    """sha256 over the wheel's member names and bytes (a rebuilt, identical wheel matches)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as whl:
        for name in sorted(whl.namelist()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(whl.read(name)).digest())
    return digest.hexdigest()


def deploy_key(base: str, wheel: Path) -> str:
    files = sorted(DEPLOY_FILES.iterdir())
    inputs = {
        "base": base,
        "wheel": wheel_digest(wheel),
        "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
        "module": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _install_wheel(root: Path, wheels: Path, wheel: Path) -> None:
    """docs/deploy.rst step 2, offline: a plain venv, then pip install of the wheel."""
    stage = _path_in(root, STAGE)
    shutil.copytree(wheels, stage / "wheels", ignore=shutil.ignore_patterns(".complete"))
    shutil.copyfile(wheel, stage / wheel.name)
    _chroot(root, ["python3", "-m", "venv", VENV], timeout_s=300)
    pip = [f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pip += ["--no-index", "--no-cache-dir", "--find-links", f"{STAGE}/wheels"]
    _chroot(root, [*pip, f"{STAGE}/{wheel.name}{EXTRAS}"], timeout_s=900)
    _chroot(root, [f"{VENV}/bin/vmt-initenv.py", "--help"])
    shutil.rmtree(stage)


def _install_systemd_glue(root: Path) -> None:
    """PID 1 is systemd; the two guestkit units are enabled; ``MASKED`` are masked."""
    init = _path_in(root, "/sbin/guestkit-init")
    init.unlink(missing_ok=True)
    init.symlink_to("/lib/systemd/systemd")
    script = _path_in(root, f"/usr/local/sbin/{SCRIPT}")
    shutil.copyfile(DEPLOY_FILES / SCRIPT, script)
    script.chmod(0o755)
    for unit in UNITS:
        shutil.copyfile(DEPLOY_FILES / unit, _path_in(root, f"/etc/systemd/system/{unit}"))
    _chroot(root, ["systemctl", "enable", "--quiet", *UNITS])
    _chroot(root, ["systemctl", "mask", "--quiet", *MASKED])
    _chroot(root, ["systemctl", "disable", "--quiet", "postgresql.service"])
    _path_in(root, "/etc/hostname").write_text("guest\n")
    _path_in(root, "/etc/hosts").write_text("127.0.0.1 localhost\n")
    _path_in(root, "/etc/machine-id").write_text("")  # each boot gets its own


def _build(entry: Path, work: Path, inputs: Inputs, key: str, wheels: Path, wheel: Path) -> None:
    versions, packages, mirror = inputs.versions, inputs.packages, inputs.mirror
    timings: dict[str, float] = {}
    started = time.monotonic()
    root = work / "rootfs"
    kernel = versions["kernel"]
    layer = _timed(
        timings, "debootstrap", lambda: debootstrap_layer(work.parent, packages, versions, mirror)
    )
    copy = ["cp", "-a", "--reflink=auto", str(layer / "root"), str(root)]
    _timed(timings, "copy", lambda: execute(copy, timeout_s=600))
    vmlinuz, moddir = _fetch_kernel(work, kernel, versions[kernel])
    shutil.copyfile(vmlinuz, entry / "vmlinuz")
    version = _timed(timings, "modules", lambda: _install_kernel_modules(root, moddir))
    _timed(timings, "venv", lambda: _install_wheel(root, wheels, wheel))
    _install_systemd_glue(root)
    _make_initrd(root, version, entry / "initrd.gz")
    installed = _installed_versions(root)
    _timed(timings, "mkfs", lambda: _make_image(root, entry / "rootfs.img"))
    timings["total"] = round(time.monotonic() - started, 2)
    manifest = {
        "key": key,
        "kernel_package": f"{kernel}={versions[kernel]}",
        "kernel_version": version,
        "wheel": wheel.name,
        "venv": VENV,
        "installed": installed,
        "rootfs_allocated_mib": round((entry / "rootfs.img").stat().st_blocks * 512 / 2**20),
        "timings_s": timings,
    }
    _write_json(entry / "manifest.json", manifest)


def build_deploy_guest(
    wheel: Path | str,
    cache_dir: Path | str | None = None,
    *,
    requirements: Path | str = CHECKOUT / "requirements.txt",
    mirror: str | None = None,
    host_python: str = sys.executable,
    keep: int = 2,
) -> Guest:
    """The deployment guest for ``wheel``: from the cache, or built (~30 s on a cached
    debootstrap layer, ~2 min cold). Raises like ``build_guest``."""
    wheel = Path(wheel).absolute()
    if not wheel.is_file():
        raise NotFound("wheel", str(wheel))
    packages = [*PACKAGES, *SYSTEMD_PACKAGES, *POSTGRESQL_PACKAGES]
    inputs = resolve_inputs(cache_dir, requirements, mirror, packages)
    key = deploy_key(inputs.key(), wheel)

    def build(into: Path, work: Path) -> None:
        wheels = wheelhouse(inputs.cache_dir, inputs.requirements, host_python)
        _build(into, work, inputs, key, wheels, wheel)

    guest = build_entry(inputs, "deploy-", key, keep, build)
    return dataclasses.replace(guest, venv_python=f"{VENV}/bin/python")
