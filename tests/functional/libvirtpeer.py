"""A second libvirtd on this machine, as a second node's hypervisor for live migration tests.

libvirt refuses to migrate a guest to the daemon it runs on (or to one with the same host
UUID), and a privileged libvirtd keeps its state in fixed places (``/run/libvirt``,
``/var/lib/libvirt``, ``/etc/libvirt/qemu``: a second one there would take the first one's
domains). So ``PeerLibvirtd(base, host_uuid)`` runs ``libvirtd`` in a mount namespace of
its own (``unshare --mount --propagation slave``) where those folders are bind mounts of
``base/{etc,run,lib,cache,log}``:

- ``etc``: this host's ``libvirtd.conf`` and ``qemu.conf`` plus ``host_uuid``,
  ``stdio_handler = "file"`` (no virtlogd in there) and no cgroups (the domains' cgroup names
  would collide with the first daemon's); no domain, network or filter definitions;
- ``cache``: a copy of the QEMU capabilities cache (no 8 s probe at start);
- its socket is ``base/run/libvirt-sock``, reached from here as ``uri``.

QEMU started by it sees the files of this namespace as they were when it started, and any
mount made later only under folders shared *before* it started (``share``): a node's
qemu-storage-daemon mounts its FUSE exports (the guests' backing files) in the root
namespace, so the node's folder must be shared first. ``stop`` ends libvirtd by PID (its
QEMUs must be gone first: destroy their domains) and removes ``base``; ``unshare_all``
undoes ``share``. ``start`` stops a killed run's peer first (same ``base``).

Run as ``python -m tests.functional.libvirtpeer BASE`` inside the new namespace: it makes
the bind mounts and execs libvirtd (``-d``: it forks, writes ``BASE/libvirtd.pid``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import libvirt

from brick.daemon import Supervisor
from brick.executor import execute
from brick.libvirtd import libvirt_answers
from brick.wait import wait_until

BINDS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)
CONF_FILES = ("libvirt.conf", "libvirtd.conf", "qemu.conf")


class PeerLibvirtd:
    def __init__(self, base: Path, host_uuid: str) -> None:
        self.base = base
        self.host_uuid = host_uuid
        self.pidfile = base / "libvirtd.pid"
        self.uri = f"qemu+unix:///system?socket={base / 'run' / 'libvirt-sock'}"
        pidfile = str(self.pidfile)
        self._supervisor = Supervisor(
            "libvirtd", self.pidfile, lambda argv: "libvirtd" in argv[0] and pidfile in argv
        )
        self._shared: list[Path] = []

    def share(self, folder: Path) -> None:
        """Make ``folder`` a shared mount (a bind mount on itself), so that what is mounted
        under it later shows in the peer's namespace too. Before ``start``."""
        execute(["mount", "--bind", str(folder), str(folder)])
        self._shared.append(folder)
        execute(["mount", "--make-shared", str(folder)])

    def unshare_all(self, timeout_s: float = 15.0) -> None:
        """Undo ``share`` (after everything mounted under the folders is gone). The peer's
        namespace outlives its last process by a moment (the unmount is busy meanwhile)."""
        while self._shared:
            folder = self._shared.pop()
            wait_until(
                lambda f=folder: (
                    execute(["umount", str(f)], check_exit_code=(0, 32)).exit_code == 0
                ),
                timeout_s=timeout_s,
                what=f"{folder} to unmount",
            )

    def start(self, timeout_s: float = 60.0) -> PeerLibvirtd:
        self.stop()  # a killed run's peer (its pidfile is in base, which is laid anew)
        shutil.rmtree(self.base, ignore_errors=True)
        for folder, _ in BINDS:
            (self.base / folder).mkdir(parents=True)
        for sub in ("lib/qemu", "log/qemu", "etc/qemu"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        etc = self.base / "etc"
        for name in CONF_FILES:
            shutil.copy(Path("/etc/libvirt") / name, etc / name)
        with open(etc / "libvirtd.conf", "a") as conf:
            conf.write(f'\nhost_uuid = "{self.host_uuid}"\n')
        with open(etc / "qemu.conf", "a") as conf:
            conf.write('\nstdio_handler = "file"\ncgroup_controllers = [ ]\n')
        if Path("/var/cache/libvirt/qemu").is_dir():
            shutil.copytree("/var/cache/libvirt/qemu", self.base / "cache" / "qemu")
        argv = ["unshare", "--mount", "--propagation", "slave", "--",
                sys.executable, "-m", "tests.functional.libvirtpeer", str(self.base)]  # fmt: skip
        repo = Path(__file__).resolve().parents[2]
        self._supervisor.daemonize(argv, env={**os.environ, "PYTHONPATH": str(repo)})
        wait_until(
            lambda: libvirt_answers(self.uri),
            timeout_s=timeout_s,
            what=f"the peer libvirtd on {self.uri}",
        )
        return self

    def stop(self) -> None:
        """End the peer libvirtd named by our pidfile (checked by its command line), then
        remove its folders."""
        self._supervisor.stop(timeout_s=15)
        shutil.rmtree(self.base, ignore_errors=True)

    def domains(self) -> list[str]:
        conn = libvirt.open(self.uri)
        try:
            return sorted(d.name() for d in conn.listAllDomains(0))
        finally:
            conn.close()


def _inside(base: Path) -> None:
    """In the new mount namespace: the bind mounts, then libvirtd."""
    for folder, target in BINDS:
        execute(["mount", "--bind", str(base / folder), target])
    os.execvp("libvirtd", ["libvirtd", "-d", "-p", str(base / "libvirtd.pid")])


if __name__ == "__main__":
    _inside(Path(sys.argv[1]))
