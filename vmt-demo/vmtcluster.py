#!/usr/bin/env python3
"""The main job: a whole VMThunder cluster on one machine, booting real VMs.

It starts Volt, an image server and N compute nodes (each a virtmanserver with the ``qemu``
driver in its own network namespace, on a private bridge), builds a small bootable guest
from Debian packages (cached after the first run), exports its disk from the image server
with ``vmtimg.py``, creates M VM instances per node with ``vmtrun.py``, boots every instance
under libvirt (QEMU), waits until each console shows that the guest booted and read its
disk, verifies, reports, and tears everything down (``--keep`` leaves it running). Before the
teardown, the first node's z/VM Cloud Connector-shaped API (enabled on that node only) is
driven once by ``zvmdemo.py`` with the connector's client: one more guest imported, created,
deployed, started, its console marker read, deleted.

Its last line is ``vmtcluster: <V> VMs booted on <N> nodes in <T> s; image server sent <B1>
bytes, peers sent <B2> bytes; verified``, and it exits 0 only if every VM booted and
verified. Run it as root.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # cluster and guestimage live next to this script
    sys.path.insert(0, str(HERE))

import guestimage  # noqa: E402
from cluster import PYTHON, LocalCluster  # noqa: E402

from brick.libvirtd import LibvirtDaemons  # noqa: E402
from brick.netns import Lab  # noqa: E402
from brick.wait import wait_until  # noqa: E402
from virtman.guest.domains import VirtualMachines  # noqa: E402

IMAGE = "image1"
LAB, SUBNET, TGT_BASE = "vmtc", "10.233.0.0/24", 3500
LAB_STATE = Path("/run/vmtcluster")
ZVM_PREFIX = "zvm-"  # n1's guests made through the z/VM API: domain vmt-zvm-<USERID>


def say(message: str) -> None:
    print(f"vmtcluster: {message}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def run_in(cluster: LocalCluster, host: str, argv: Sequence[str]) -> None:
    """Run a demo script inside ``host``'s namespace, its output shown as it comes."""
    proc = subprocess.run([*cluster.hosts[host].nsenter_argv(), *argv], check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(argv[1]).name} exited {proc.returncode}")


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir).absolute()
        self.cluster: LocalCluster | None = None
        self.libvirt: LibvirtDaemons | None = None
        self.vms: VirtualMachines | None = None
        self.instances: list[tuple[str, str]] = []  # (node, vm)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        started = time.monotonic()
        guest = guestimage.build_guest(Path(args.cache_dir))
        say(f"guest ready ({guest.kernel_package}, {guest.rootfs.stat().st_size >> 20} MiB disk)")
        Lab.cleanup(LAB, LAB_STATE)  # a previous run that was killed
        shutil.rmtree(self.workdir, ignore_errors=True)
        (self.workdir / "consoles").mkdir(parents=True)
        image_file = self.workdir / "images" / f"{IMAGE}.raw"
        image_file.parent.mkdir()
        shutil.copyfile(guest.rootfs, image_file)
        image_sha = sha256(image_file)

        self.libvirt = LibvirtDaemons(self.workdir / "libvirt")
        self.libvirt.start()
        self.vms = VirtualMachines()
        cluster = self.cluster = LocalCluster(
            self.workdir / "cluster",
            args.nodes,
            name=LAB,
            subnet=SUBNET,
            tgt_control_base=TGT_BASE,
            lab_state_dir=LAB_STATE,
            executor=args.executor,
            bus=args.bus,
            node_conf={"n1": self._zvm_conf(guest)},
        )
        cluster.start()
        say(f"Volt, an image server and {args.nodes} compute nodes are up")
        sent_at_start = self._sent()

        img = cluster.hosts["img"].address
        cfg = self.workdir / "image.cfg"
        cfg.write_text(f"+ {img} {IMAGE} {image_file}\n")
        run_in(cluster, "ctl", self._script("vmtimg.py", cfg))
        lines = []
        for node in cluster.node_names:
            for i in range(1, args.vms_per_node + 1):
                vm = f"vm-{node}-{i}"
                self.instances.append((node, vm))
                lines.append(f"+ {cluster.hosts[node].address} {vm} {img} {IMAGE}\n")
        cfg = self.workdir / "nodelist.cfg"
        cfg.write_text("".join(lines))
        boot_started = time.monotonic()
        run_in(cluster, "ctl", self._script("vmtrun.py", cfg))

        booted_at = self._boot_all(guest)
        elapsed = time.monotonic() - boot_started
        image_sent, peers_sent = (b - a for a, b in zip(sent_at_start, self._sent(), strict=True))
        self._verify(image_file, image_sha)
        self._report(booted_at, boot_started, image_sent, peers_sent, image_file)
        self._zvm_demo(guest, image_file)
        if args.keep:
            self._keep_note()
        else:
            self.teardown()
        say(
            f"{len(self.instances)} VMs booted on {args.nodes} nodes in {elapsed:.1f} s; "
            f"image server sent {image_sent} bytes, peers sent {peers_sent} bytes; verified"
        )
        say(f"whole run {time.monotonic() - started:.1f} s")
        return 0

    def _zvm_conf(self, guest: guestimage.GuestImage) -> str:
        """The first node serves the z/VM-shaped API on its loopback, with its guests."""
        return (
            "zvm_api_enabled = true\n"
            f"guest_kernel = {guest.kernel}\nguest_initrd = {guest.initrd}\n"
            f"guest_cmdline = {guest.cmdline} vmt.stay\nguest_name_prefix = {ZVM_PREFIX}\n"
        )

    def _zvm_demo(self, guest: guestimage.GuestImage, image_file: Path) -> None:
        """zvmdemo.py in n1's namespace: one guest through the z/VM API, then gone."""
        assert self.cluster is not None
        token_file = self.workdir / "zvm-token"
        token_file.touch(mode=0o600)
        token_file.write_text(self.cluster.token)
        say("z/VM API on n1: zvmconnector imports the image, creates, deploys, starts a guest")
        run_in(
            self.cluster,
            "n1",
            [PYTHON, str(HERE / "zvmdemo.py"), "--token-file", str(token_file),
             "--image-file", str(image_file), "--marker", guest.expected_marker],
        )  # fmt: skip

    def _script(self, name: str, cfg: Path) -> list[str]:
        assert self.cluster is not None
        return [PYTHON, str(HERE / name), "--file", str(cfg), "--token", self.cluster.token]

    def _sent(self) -> tuple[int, int]:
        """Bytes sent so far by the image server, and by all compute nodes together."""
        assert self.cluster is not None
        peers = sum(self.cluster.tx_bytes(n) for n in self.cluster.node_names)
        return self.cluster.tx_bytes("img"), peers

    def _disk(self, node: str, vm: str) -> Path:
        assert self.cluster is not None
        return self.cluster.node_dir(node) / "state" / "instances" / f"{vm}.qcow2"

    def _console(self, vm: str) -> Path:
        return self.workdir / "consoles" / f"{vm}.log"

    def _boot_all(self, guest: guestimage.GuestImage) -> dict[str, float]:
        """Boot every instance at once; returns when each console showed its marker."""
        assert self.vms is not None
        cmdline = guest.cmdline + (" vmt.stay" if self.args.keep else "")
        for node, vm in self.instances:
            self.vms.boot(
                vm,
                self._disk(node, vm),
                kernel=guest.kernel,
                initrd=guest.initrd,
                cmdline=cmdline,
                console_log=self._console(vm),
            )
        say(f"{len(self.instances)} VMs started under libvirt; waiting for their consoles")
        booted_at: dict[str, float] = {}

        def all_booted() -> bool:
            for _, vm in self.instances:
                if vm in booted_at:
                    continue
                log = self._console(vm)
                text = log.read_text(errors="replace") if log.exists() else ""
                fields = guestimage.parse_marker(text)
                if fields is None:
                    continue
                if not guest.marker_matches(fields):
                    raise RuntimeError(f"{vm} booted but read the wrong disk: {fields}")
                booted_at[vm] = time.monotonic()
                say(f"{vm} booted (guest uptime {fields.get('uptime', '?')} s)")
            return len(booted_at) == len(self.instances)

        try:
            wait_until(all_booted, timeout_s=self.args.boot_timeout, what="every VM to boot")
        except Exception:
            for _, vm in self.instances:
                if vm not in booted_at:
                    tail = self._console(vm).read_text(errors="replace")[-800:]
                    say(f"{vm} did not boot; console tail:\n{tail}")
            raise
        return booted_at

    def _verify(self, image_file: Path, image_sha: str) -> None:
        assert self.cluster is not None
        if sha256(image_file) != image_sha:
            raise RuntimeError("the image file changed")
        tree = self.cluster.volt_tree(f"volume-{IMAGE}")
        hosts = {n["host"] for n in tree if n["status"] == "OK"}
        wanted = {self.cluster.hosts[n].address for n in self.cluster.node_names}
        if hosts != wanted:
            raise RuntimeError(f"Volt's tree has {sorted(hosts)}, not {sorted(wanted)}")

    def _report(
        self,
        booted_at: dict[str, float],
        boot_started: float,
        image_sent: int,
        peers_sent: int,
        image_file: Path,
    ) -> None:
        assert self.cluster is not None
        tree = self.cluster.volt_tree(f"volume-{IMAGE}")
        by_host = {n["host"]: n for n in tree}
        say("node      depth  reads from                      VMs")
        for node in self.cluster.node_names:
            entry = by_host[self.cluster.hosts[node].address]
            parents = ", ".join(entry["parents"]) or "the image server"
            vms = [vm for n, vm in self.instances if n == node]
            times = ", ".join(f"{vm} {booted_at[vm] - boot_started:.1f} s" for vm in vms)
            say(f"{node:<9} {entry['depth']:<6} {parents:<31} {times}")
        size = image_file.stat().st_size
        say(
            f"image {size >> 20} MiB; image server sent {image_sent / size:.2f} images' worth "
            f"for {len(self.instances)} VMs; peers sent {peers_sent / size:.2f}"
        )

    def _keep_note(self) -> None:
        assert self.cluster is not None
        say(
            f"--keep: left running in {self.workdir} (lab {LAB}); remove it all with "
            f"'{sys.argv[0]} --clean'"
        )
        # The page is only reachable inside the lab's namespaces; the token goes to a 0600
        # file rather than the terminal.
        volt = self.cluster.hosts["volt"]
        token_file = self.workdir / "admin-token"
        token_file.touch(mode=0o600)
        token_file.write_text(self.cluster.token)
        say(
            f"status page: http://{volt.address}:7447/status from namespace {volt.netns} "
            f"('ip netns exec {volt.netns} ...'); log in with the admin token "
            f"(X-Auth-Token, docs/cluster.rst) in {token_file}"
        )

    # -- teardown ----------------------------------------------------------------------------
    def teardown(self) -> None:
        """Destroy the VMs, then the instances and image target, then every daemon."""
        errors = []
        if self.vms is not None:
            for _, vm in self.instances:  # a boot that failed half way may have defined it
                try:
                    self.vms.destroy(vm)
                except Exception as exc:
                    errors.append(f"VM {vm}: {exc}")
            with contextlib.suppress(Exception):  # zvmdemo.py's guest, if it failed half way
                self.vms.destroy(f"{ZVM_PREFIX}ZVMDEMO")
            self.vms.close()
            self.vms = None
        if self.cluster is not None:
            try:
                self._destroy_through_scripts()
            except Exception as exc:
                errors.append(f"destroy: {exc}")
            self.cluster.close()
            self.cluster = None
        if self.libvirt is not None:
            self.libvirt.stop()
            self.libvirt = None
        for error in errors:
            say(f"teardown: {error}")

    def _destroy_through_scripts(self) -> None:
        assert self.cluster is not None
        if not self.instances:
            return
        cfg = self.workdir / "nodelist-destroy.cfg"
        cfg.write_text(
            "".join(f"- {self.cluster.hosts[n].address} {vm}\n" for n, vm in self.instances)
        )
        run_in(self.cluster, "ctl", self._script("vmtrun.py", cfg))
        img = self.cluster.hosts["img"].address
        cfg = self.workdir / "image-destroy.cfg"
        cfg.write_text(f"- {img} {IMAGE}\n")
        run_in(self.cluster, "ctl", self._script("vmtimg.py", cfg))


def clean(workdir: Path) -> None:
    """Remove what a ``--keep`` run (or a killed one) left."""
    vms = VirtualMachines()
    for info in vms.list():
        vms.destroy(info.instance)
    vms.close()
    Lab.cleanup(LAB, LAB_STATE)
    daemons = LibvirtDaemons(workdir / "libvirt")
    daemons.adopt()  # the ones the --keep run started (others are left alone)
    daemons.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmtcluster.py",
        description="Start Volt, an image server and N compute nodes on this machine (one "
        "network namespace each), create M VMs per node with vmtrun.py, boot them under "
        "libvirt, verify, report and tear everything down. Run as root.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="Compute nodes (default 3).")
    parser.add_argument("--vms-per-node", type=int, default=1, help="VMs per node (default 1).")
    parser.add_argument(
        "--executor", default="balanced", help="Volt's placement: balanced, btree, ..."
    )
    parser.add_argument(
        "--bus",
        action="store_true",
        help="Run the control bus: a private RabbitMQ in Volt's namespace (docs/bus.rst).",
    )
    parser.add_argument("--keep", action="store_true", help="Leave everything running.")
    parser.add_argument("--clean", action="store_true", help="Remove what --keep left, exit.")
    parser.add_argument(
        "--workdir",
        default="/var/lib/vmthunder/vmtcluster",
        help="Where the run lives (wiped first).",
    )
    parser.add_argument(
        "--cache-dir",
        default="/var/cache/vmthunder/guest",
        help="Where the built guest is kept between runs.",
    )
    parser.add_argument(
        "--boot-timeout", type=float, default=300.0, help="Seconds for all VMs to boot."
    )
    args = parser.parse_args(argv)
    if args.clean:
        clean(Path(args.workdir).absolute())
        say("cleaned")
        return 0
    if not 1 <= args.nodes <= 60 or not 1 <= args.vms_per_node <= 16:
        parser.error("--nodes must be 1-60 and --vms-per-node 1-16")
    demo = Demo(args)
    try:
        return demo.run()
    except KeyboardInterrupt:
        say("interrupted; tearing down")
        return 130
    except Exception as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        if not args.keep:
            demo.teardown()


if __name__ == "__main__":
    sys.exit(main())
