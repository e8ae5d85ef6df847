#!/usr/bin/env python3
"""The main job: a whole VMThunder cluster on one machine, booting real VMs.

It starts Volt with its cluster controller, an image server and N compute nodes (each a
virtmanserver with the ``qemu`` driver in its own network namespace, on a private bridge,
serving guests under libvirt/QEMU), builds a small bootable guest from Debian packages
(cached after the first run), exports its disk from the image server with ``vmtimg.py``,
then starts all N x M VMs with ONE ``POST /v1/clusters`` (``vmtburst.py``, which prints the
VMs placed / deploying / running / failed until the task is done): the controller places
them M per node and each node deploys its guests from the image server through Volt's tree.
It waits until each console shows that the guest booted and read its disk, verifies,
reports, and tears everything down through the controller (``--keep`` leaves it running and
says where the status page is). Before the teardown, the first node's z/VM Cloud
Connector-shaped API (enabled on that node only) is driven once by ``zvmdemo.py`` with the
connector's client: one more guest imported, created, deployed, started, its console marker
read, captured into a new base image (exported by n1), deleted; then n2 boots a VM from the
captured image through Volt's tree of it (n1's target its source, the image server not
involved), the VM is destroyed and n1 deletes the captured image.

Its last line is ``vmtcluster: <V> VMs booted on <N> nodes in <T> s; image server sent <B1>
bytes, peers sent <B2> bytes; verified``, and it exits 0 only if every VM booted and
verified. Run it as root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # cluster and guestimage live next to this script
    sys.path.insert(0, str(HERE))

import guestimage  # noqa: E402
from cluster import PYTHON, LocalCluster  # noqa: E402

from brick.exception import BrickError  # noqa: E402
from brick.libvirtd import LibvirtDaemons  # noqa: E402
from brick.netns import Lab, validate_lab_name  # noqa: E402
from brick.wait import wait_until  # noqa: E402
from virtman.guest.domains import VirtualMachines  # noqa: E402

IMAGE = "image1"
CAPTURED = "zvmcap"  # the image n1's z/VM API captures its guest into
ISCSI_PORT = 3260
SUBNET = "10.233.0.0/24"
LAB_STATE = Path("/run/vmtcluster")
FLAVOR = {"vcpus": 1, "memory_mb": 128}


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
        self.instances: list[tuple[str, str, str]] = []  # (node, vm, userid)
        self.burst_file = self.workdir / "burst.json"  # vmtburst.py's result
        self.token_file = self.workdir / "admin-token"
        # Every node's guests (the burst's and zvmdemo.py's): domain vmt-<lab>-<USERID>
        self.guest_prefix = guest_prefix(args.lab)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        started = time.monotonic()
        guest = guestimage.build_guest(Path(args.cache_dir))
        say(f"guest ready ({guest.kernel_package}, {guest.rootfs.stat().st_size >> 20} MiB disk)")
        Lab.cleanup(args.lab, LAB_STATE)  # a previous run that was killed
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
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
            name=args.lab,
            subnet=SUBNET,
            tgt_control_base=args.tgt_control_base,
            lab_state_dir=LAB_STATE,
            executor=args.executor,
            bus=args.bus,
            controller=True,
            node_conf=self._node_conf(guest),
        )
        cluster.start()
        say(f"Volt, its cluster controller, an image server and {args.nodes} nodes are up")
        sent_at_start = self._sent()
        self.token_file.touch(mode=0o600)  # scripts and the status page read it, not argv
        self.token_file.write_text(cluster.token)

        img = cluster.hosts["img"].address
        cfg = self.workdir / "image.cfg"
        cfg.write_text(f"+ {img} {IMAGE} {image_file}\n")
        run_in(
            cluster, "ctl", self._script("vmtimg.py", "--file", str(cfg), "--token", cluster.token)
        )
        burst = self._burst()
        boot_started = burst["posted_at"]

        booted_at = self._wait_for_consoles(guest)
        elapsed = max(booted_at.values()) - boot_started
        image_sent, peers_sent = (b - a for a, b in zip(sent_at_start, self._sent(), strict=True))
        self._verify(image_file, image_sha)
        self._report(booted_at, boot_started, image_sent, peers_sent, image_file)
        self._zvm_demo(guest, image_file)
        if args.nodes >= 2:
            self._boot_captured(guest)
        if args.keep:
            self._keep_note(burst["task"])
        else:
            self.teardown()
        say(
            f"{len(self.instances)} VMs booted on {args.nodes} nodes in {elapsed:.1f} s; "
            f"image server sent {image_sent} bytes, peers sent {peers_sent} bytes; verified"
        )
        say(f"whole run {time.monotonic() - started:.1f} s")
        return 0

    def _node_conf(self, guest: guestimage.GuestImage) -> dict[str, str]:
        """Every node serves guests of the built kernel (they stay up after their marker);
        the first one serves the z/VM-shaped API on its loopback too."""
        assert self.args.nodes >= 1
        conf = (
            f"guest_kernel = {guest.kernel}\nguest_initrd = {guest.initrd}\n"
            f"guest_cmdline = {guest.cmdline} vmt.stay\nguest_name_prefix = {self.guest_prefix}\n"
        )
        nodes = {f"n{i + 1}": conf for i in range(self.args.nodes)}
        nodes["n1"] += "zvm_api_enabled = true\n"
        return nodes

    def _burst(self) -> dict[str, Any]:
        """All the VMs with one POST /v1/clusters (vmtburst.py in the control host, printing
        progress); the final task, ``posted_at`` the epoch time of the POST's answer."""
        assert self.cluster is not None
        count = self.args.nodes * self.args.vms_per_node
        say(f"starting {count} VMs with one POST /v1/clusters ({FLAVOR['vcpus']} vcpu, "
            f"{FLAVOR['memory_mb']} MB each)")  # fmt: skip
        try:
            run_in(
                self.cluster,
                "ctl",
                self._script(
                    "vmtburst.py", *self._volt_options(), "start", IMAGE,
                    "--count", str(count), "--vcpus", str(FLAVOR["vcpus"]),
                    "--memory-mb", str(FLAVOR["memory_mb"]), "--name", "vm",
                    "--nodes-up", str(self.args.nodes), "--result", str(self.burst_file),
                ),
            )  # fmt: skip
        finally:  # the task and its VMs are known even if the burst failed
            burst = json.loads(self.burst_file.read_text()) if self.burst_file.exists() else {}
            self.instances = [(vm["node"], vm["name"], vm["userid"]) for vm in burst.get("vms", [])]
        return burst

    def _volt_options(self) -> list[str]:
        assert self.cluster is not None
        volt = self.cluster.hosts["volt"].address
        return ["--volt", f"http://{volt}:7447", "--token-file", str(self.token_file)]

    def _zvm_demo(self, guest: guestimage.GuestImage, image_file: Path) -> None:
        """zvmdemo.py in n1's namespace: one guest through the z/VM API, then gone."""
        assert self.cluster is not None
        say("z/VM API on n1: zvmconnector imports the image, creates, deploys, starts a guest")
        capture = ["--capture", CAPTURED] if self.args.nodes >= 2 else []
        run_in(
            self.cluster,
            "n1",
            self._script("zvmdemo.py", "--token-file", str(self.token_file),
                         "--image-file", str(image_file), "--marker", guest.expected_marker,
                         *capture),
        )  # fmt: skip

    def _boot_captured(self, guest: guestimage.GuestImage) -> None:
        """n2 boots a VM from the image n1 captured, through Volt's tree of it (n1's target
        is its source); the VM and n2's disk are destroyed and n1 deletes the image."""
        assert self.cluster is not None and self.vms is not None
        cluster, vms = self.cluster, self.vms
        source, node = cluster.node_names[:2]
        target = f"volume-{CAPTURED}"
        connection = {
            "target_portal": f"{cluster.hosts[source].address}:{ISCSI_PORT}",
            "target_iqn": f"iqn.2010-10.org.openstack:{target}",
            "target_lun": 1,
        }
        instance = f"{self.guest_prefix}{CAPTURED}"  # torn down with the lab's guests
        log = self.workdir / f"{instance}.log"
        sent_before = self.cluster.tx_bytes("img")
        started = time.monotonic()
        result = cluster.rpc(node, "create", instance, CAPTURED, connection)
        if not result.startswith("0:"):
            raise RuntimeError(f"{node}: create from {CAPTURED}: {result}")
        try:
            vms.boot(instance, result[2:], kernel=guest.kernel, initrd=guest.initrd,
                     cmdline=guest.cmdline, console_log=log)  # fmt: skip
            fields = wait_until(
                lambda: (
                    guestimage.parse_marker(log.read_text(errors="replace"))
                    if log.exists()
                    else None
                ),
                timeout_s=self.args.boot_timeout,
                what=f"the VM on {node} from {CAPTURED} to boot",
            )
            if not guest.marker_matches(fields):
                raise RuntimeError(f"the VM from {CAPTURED} read the wrong disk: {fields}")
            booted = time.monotonic() - started
            [entry] = cluster.volt_tree(target)
        finally:
            vms.destroy(instance)
            destroyed = cluster.rpc(node, "destroy", instance)
        if destroyed != "0:":
            raise RuntimeError(f"{node}: destroy {instance}: {destroyed}")
        image_sent = self.cluster.tx_bytes("img") - sent_before
        parents = ", ".join(entry["parents"]) or f"{source}'s target"
        say(
            f"{node} booted a VM from {CAPTURED} (captured on {source}) in {booted:.1f} s "
            f"through Volt's tree of it, reading from {parents}; the image server sent "
            f"{image_sent} bytes meanwhile"
        )
        run_in(cluster, source, self._script("zvmdemo.py", "--token-file", str(self.token_file),
                                             "--delete-image", CAPTURED))  # fmt: skip
        say(f"captured image booted on {node} and deleted: {time.monotonic() - started:.1f} s")

    @staticmethod
    def _script(name: str, *args: str) -> list[str]:
        return [PYTHON, str(HERE / name), *args]

    def _sent(self) -> tuple[int, int]:
        """Bytes sent so far by the image server, and by all compute nodes together."""
        assert self.cluster is not None
        peers = sum(self.cluster.tx_bytes(n) for n in self.cluster.node_names)
        return self.cluster.tx_bytes("img"), peers

    def _console(self, node: str, userid: str) -> Path:
        """Where the node's guest manager writes the guest's serial console."""
        assert self.cluster is not None
        return self.cluster.node_dir(node) / "state" / "guests" / f"{self.guest_prefix}{userid}.log"

    def _wait_for_consoles(self, guest: guestimage.GuestImage) -> dict[str, float]:
        """When (epoch seconds) each VM's console first showed its marker."""
        say(f"{len(self.instances)} VMs running; waiting for their consoles")
        booted_at: dict[str, float] = {}

        def all_booted() -> bool:
            for node, vm, userid in self.instances:
                if vm in booted_at:
                    continue
                log = self._console(node, userid)
                text = log.read_text(errors="replace") if log.exists() else ""
                fields = guestimage.parse_marker(text)
                if fields is None:
                    continue
                if not guest.marker_matches(fields):
                    raise RuntimeError(f"{vm} booted but read the wrong disk: {fields}")
                booted_at[vm] = time.time()
                say(f"{vm} booted on {node} (guest {userid}, uptime {fields.get('uptime', '?')} s)")
            return len(booted_at) == len(self.instances)

        try:
            wait_until(all_booted, timeout_s=self.args.boot_timeout, what="every VM to boot")
        except Exception:
            for node, vm, userid in self.instances:
                if vm not in booted_at:
                    log = self._console(node, userid)
                    tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
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
            vms = [vm for n, vm, _ in self.instances if n == node]
            times = ", ".join(f"{vm} {booted_at[vm] - boot_started:.1f} s" for vm in vms)
            say(f"{node:<9} {entry['depth']:<6} {parents:<31} {times}")
        size = image_file.stat().st_size
        say(
            f"image {size >> 20} MiB; image server sent {image_sent / size:.2f} images' worth "
            f"for {len(self.instances)} VMs; peers sent {peers_sent / size:.2f}"
        )

    def _keep_note(self, task: str) -> None:
        assert self.cluster is not None
        say(
            f"--keep: left running in {self.workdir} (lab {self.args.lab}); remove it all with "
            f"'{sys.argv[0]} --clean --lab {self.args.lab} --workdir {self.workdir}'"
        )
        # The page is only reachable inside the lab's namespaces; the token stays in its
        # 0600 file rather than the terminal.
        volt = self.cluster.hosts["volt"]
        say(
            f"status page: http://{volt.address}:7447/status from namespace {volt.netns} "
            f"('ip netns exec {volt.netns} ...'); log in with the admin token "
            f"(X-Auth-Token, docs/cluster.rst) in {self.token_file}; the burst is task {task} "
            f"(GET /v1/clusters/{task})"
        )

    # -- teardown ----------------------------------------------------------------------------
    def teardown(self) -> None:
        """Destroy the burst through the controller, any guest domain of ours it left, the
        image target, then every daemon."""
        errors = []
        if self.cluster is not None:
            try:
                self._destroy_through_scripts()
            except Exception as exc:
                errors.append(f"destroy: {exc}")
        if self.vms is not None:
            for info in self.vms.list():  # a burst or zvmdemo.py that failed half way
                if info.instance.startswith(self.guest_prefix):
                    try:
                        self.vms.destroy(info.instance)
                    except Exception as exc:
                        errors.append(f"VM {info.instance}: {exc}")
            self.vms.close()
            self.vms = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        if self.libvirt is not None:
            self.libvirt.stop()
            self.libvirt = None
        for error in errors:
            say(f"teardown: {error}")

    def _destroy_through_scripts(self) -> None:
        """The burst's VMs (DELETE /v1/clusters/{task}), then the image's target."""
        assert self.cluster is not None
        errors = []
        if self.burst_file.exists():
            task = json.loads(self.burst_file.read_text())["task"]
            try:
                run_in(
                    self.cluster,
                    "ctl",
                    self._script("vmtburst.py", *self._volt_options(), "delete", task),
                )
            except Exception as exc:
                errors.append(exc)
        img = self.cluster.hosts["img"].address
        cfg = self.workdir / "image-destroy.cfg"
        cfg.write_text(f"- {img} {IMAGE}\n")
        try:
            run_in(
                self.cluster,
                "ctl",
                self._script("vmtimg.py", "--file", str(cfg), "--token", self.cluster.token),
            )
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise ExceptionGroup("the burst or the image target was not destroyed", errors)


def guest_prefix(lab: str) -> str:
    return f"{lab}-"


def clean(workdir: Path, lab: str) -> None:
    """Remove what a ``--keep`` run (or a killed one) of ``lab`` left."""
    vms = VirtualMachines()
    for info in vms.list():
        if info.instance.startswith(guest_prefix(lab)):
            vms.destroy(info.instance)
    vms.close()
    Lab.cleanup(lab, LAB_STATE)
    daemons = LibvirtDaemons(workdir / "libvirt")
    daemons.adopt()  # the ones the --keep run started (others are left alone)
    daemons.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmtcluster.py",
        description="Start Volt with its cluster controller, an image server and N compute "
        "nodes on this machine (one network namespace each), start N x M VMs with one POST "
        "/v1/clusters, wait until they booted, verify, report and tear everything down. "
        "Run as root.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="Compute nodes (default 3).")
    parser.add_argument(
        "--vms-per-node",
        type=int,
        default=1,
        help="VMs per node (default 1); each takes 1 vcpu of the node, and the controller "
        "does not over-commit: at most this machine's CPU count.",
    )
    parser.add_argument(
        "--executor", default="balanced", help="Volt's placement: balanced, btree, ..."
    )
    parser.add_argument(
        "--bus",
        action="store_true",
        help="Run the control bus: a private RabbitMQ in Volt's namespace (docs/bus.rst).",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="Leave everything running; print where the status page is and how to log in.",
    )
    parser.add_argument("--clean", action="store_true", help="Remove what --keep left, exit.")
    parser.add_argument(
        "--lab",
        default="vmtc",
        help="Name of the run's namespaces (<lab>-<host>) and guests (default vmtc): two runs "
        "at once need two names.",
    )
    parser.add_argument(
        "--tgt-control-base",
        type=int,
        default=3500,
        help="tgtd control port of the image server; the nodes take the next ones (default "
        "3500): two runs at once need bases at least nodes + 1 apart.",
    )
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
    try:
        validate_lab_name(args.lab)
    except BrickError as exc:
        parser.error(f"--lab: {exc}")
    if not 1 <= args.tgt_control_base <= 65535 - 61:
        parser.error("--tgt-control-base must be 1-65474")
    if args.clean:
        clean(Path(args.workdir).absolute(), args.lab)
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
