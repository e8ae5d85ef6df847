#!/usr/bin/env python3
"""The provisioning benchmark: a burst of VM boots on N nodes, side by side in one run.

One cluster (``vmt-demo/cluster.py``: volt-api, an image server and N compute nodes, each in
its own network namespace, every image-server and node link shaped with tc to ``--rate-mbit``,
default 1 Gbit/s), one image (the Debian guest of ``vmt-demo/debianguest.py``, or the tiny
one with ``--guest tiny``), these variants in turn, each from cold caches:

``single``    one node alone (VMThunder, default executor): the reference boot time
``full``      full copy: every node copies the whole image from the image server, then boots
              from its local copy (what most clouds do by default)
``direct``    on demand, no relay: every node reads straight from the image server
``btree``     VMThunder with the original's executor
``balanced``  VMThunder with the default executor
``prefetch``  VMThunder (default executor) with the boot trace prefetched (if available)

A "boot" is the replay of a recorded real boot (``bench/boottrace.py``): the guest's reads in
order, with its recorded think time between them, from the path that VM would read (a node's
origin, its local copy, its on-demand path). That stands for N VMs on N machines; N real TCG
guests on this 2-core machine would measure the CPU instead. ``--real-boots K`` adds real VM
boots under libvirt on K nodes (VMThunder, default executor), reported separately.

For each variant: time until every VM booted (p50, p99, max, from the burst's start: stack
build + boot), image-server egress, bytes peers served, bytes served by local caches, and the
ratio to ``single``. The last line::

    provision: nodes <N> vmthunder p99 <t> s (<r>x single), full-copy p99 <t> s, direct p99
    <t> s, image-server egress <b> MB vs <b> MB direct
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "vmt-demo"))
sys.path.insert(0, str(REPO / "bench"))

import boottrace  # noqa: E402
import debianguest  # noqa: E402
import guestimage  # noqa: E402
from cluster import PYTHON, LocalCluster  # noqa: E402

from brick.netns import Lab  # noqa: E402
from brick.qsd.daemon import StorageDaemon  # noqa: E402

IMAGE = "image1"
VOLUME = f"volume-{IMAGE}"
IQN = f"iqn.2010-10.org.openstack:{VOLUME}"
LAB, SUBNET, TGT_BASE = "vmtp", "10.236.0.0/24", 3600
LAB_STATE = Path("/run/vmt-provision")
MB = 1_000_000


def say(message: str) -> None:
    print(f"provision: {message}", flush=True)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Result:
    variant: str
    nodes: int
    times: list[float]
    image_server_sent: int
    peers_sent: int
    local_served: int
    read_bytes: int
    fetched: int = 0  # bytes the nodes received over the network
    notes: list[str] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.times, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.times, 0.99)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir).absolute()
        self.cluster: LocalCluster | None = None
        self.direct_daemons: list[StorageDaemon] = []
        self.trace: boottrace.BootTrace | None = None
        self.trace_path = Path()
        self.guest: guestimage.GuestImage | None = None
        self.prefetch_dir = self.workdir / "prefetch"

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        args = self.args
        cache = Path(args.cache_dir)
        self.guest = (
            debianguest.build_debian_guest(cache)
            if args.guest == "debian"
            else guestimage.build_guest(cache)
        )
        trace = self.trace = boottrace.cached_trace(
            self.guest.rootfs, self.guest.kernel, self.guest.initrd, self.guest.cmdline
        )
        self.trace_path = self.guest.rootfs.with_name(self.guest.rootfs.name + ".boot-trace.json")
        say(
            f"guest {args.guest}: image {trace.image_size >> 20} MiB, boot reads "
            f"{trace.read_bytes / MB:.1f} MB in {len(trace.reads)} requests, recorded boot "
            f"{trace.boot_s:.1f} s (TCG, alone)"
        )
        Lab.cleanup(args.lab, LAB_STATE)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.prefetch_dir.mkdir()
        image_file = self.workdir / f"{IMAGE}.raw"
        subprocess.run(
            ["cp", "--sparse=always", str(self.guest.rootfs), str(image_file)], check=True
        )
        cluster = self.cluster = LocalCluster(
            self.workdir / "cluster",
            args.nodes,
            name=args.lab,
            subnet=args.subnet,
            tgt_control_base=args.tgt_base,
            lab_state_dir=LAB_STATE,
            heartbeat_interval=2,
            node_timeout=30,
            # every node may prefetch; only the prefetch variant puts a trace there
            extra_conf=f"prefetch_dir = {self.prefetch_dir}\n",
        )
        cluster.start()
        for host in ["img", *cluster.node_names]:
            cluster.lab.shape(cluster.hosts[host], args.rate_mbit)
        result = cluster.rpc("img", "create_image_target", IMAGE, str(image_file))
        if not str(result).startswith("0:"):
            raise RuntimeError(f"create_image_target: {result}")
        say(
            f"{args.nodes} nodes and an image server up, links shaped to {args.rate_mbit} "
            "Mbit/s each way"
        )

    # -- measuring one variant -------------------------------------------------------------
    def counters(self) -> tuple[int, int, int]:
        """(image server sent, nodes sent, nodes received) so far."""
        assert self.cluster is not None
        sent, received = 0, 0
        for node in self.cluster.node_names:
            tx, rx = self.cluster.link_bytes(node)
            sent, received = sent + tx, received + rx
        return self.cluster.tx_bytes("img"), sent, received

    def burst(self, variant: str, nodes: Sequence[str], boot: Callable[[str], float]) -> Result:
        """Run ``boot(node)`` on every node at once; each returns its time to booted."""
        drop_caches()
        before = self.counters()
        times: dict[str, float] = {}
        errors: dict[str, BaseException] = {}

        def one(node: str) -> None:
            try:
                times[node] = boot(node)
            except BaseException as exc:
                errors[node] = exc

        threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            node, exc = next(iter(errors.items()))
            raise RuntimeError(f"{variant}: {len(errors)} node(s) failed, {node}: {exc}") from exc
        after = self.counters()
        assert self.trace is not None
        read = self.trace.read_bytes * len(nodes)
        # The boot reads some blocks again: those come from the node itself (its cache, or
        # the local copy), never from the network.
        rereads = (self.trace.read_bytes - self.trace.unique_bytes) * len(nodes)
        result = Result(
            variant,
            len(nodes),
            [times[n] for n in nodes],
            after[0] - before[0],
            after[1] - before[1],
            max(rereads, 0) if variant != "direct" else 0,
            read,
            fetched=after[2] - before[2],
        )
        say(
            f"{variant:<9} p50 {result.p50:6.1f} s  p99 {result.p99:6.1f} s  max "
            f"{max(result.times):6.1f} s  image server {result.image_server_sent / MB:8.1f} MB"
        )
        return result

    def replay(self, node: str, path: Path) -> float:
        """Replay the boot on ``path`` (a file in the root mount namespace: local reads)."""
        out = subprocess.run(
            [PYTHON, str(REPO / "bench" / "boottrace.py"), "replay", str(self.trace_path),
             str(path)],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"replay on {node}: {out.stderr.strip()[-500:]}")
        return float(json.loads(out.stdout)["seconds"])

    # -- the variants ----------------------------------------------------------------------
    def vmthunder(self, variant: str, executor: str, nodes: Sequence[str]) -> Result:
        assert self.cluster is not None
        cluster = self.cluster
        cluster.restart_volt(executor=executor, fresh=True)

        def boot(node: str) -> float:
            started = time.monotonic()
            answer = cluster.rpc(node, "create", f"vm-{node}", IMAGE, cluster.connection(VOLUME))
            if not str(answer).startswith("0:"):
                raise RuntimeError(f"create on {node}: {answer}")
            origin = cluster.node_dir(node) / "run" / "exports" / f"{VOLUME}.raw"
            self.replay(node, origin)
            return time.monotonic() - started

        result = self.burst(variant, nodes, boot)
        depth = max((n["depth"] for n in cluster.volt_tree(VOLUME)), default=0)
        result.notes.append(f"tree depth {depth}")
        self.empty_nodes(nodes)
        return result

    def full_copy(self, nodes: Sequence[str]) -> Result:
        assert self.cluster is not None
        cluster = self.cluster
        url = f"iscsi://{cluster.connection(VOLUME)['target_portal']}/{IQN}/1"

        def boot(node: str) -> float:
            started = time.monotonic()
            local = cluster.node_dir(node) / "full-copy.raw"
            env = self.chap_env()
            subprocess.run(
                [*cluster.hosts[node].nsenter_argv(), "qemu-img", "convert", "-O", "raw",
                 "-f", "raw", url, str(local)],
                env=env, check=True, capture_output=True, timeout=3600,
            )  # fmt: skip
            self.replay(node, local)
            elapsed = time.monotonic() - started
            local.unlink()
            return elapsed

        return self.burst("full", nodes, boot)

    def direct(self, nodes: Sequence[str]) -> Result:
        """Every node reads on demand from the image server: an iSCSI path in its own
        qemu-storage-daemon, exported as a FUSE file, no cache and no relay."""
        assert self.cluster is not None
        cluster = self.cluster
        portal = cluster.connection(VOLUME)["target_portal"]
        user, password = cluster.chap if cluster.chap else (None, None)

        def boot(node: str) -> float:
            started = time.monotonic()
            run = cluster.node_dir(node) / "direct"
            run.mkdir(exist_ok=True)
            daemon = StorageDaemon("direct-qsd", run, netns=cluster.hosts[node].netns)
            self.direct_daemons.append(daemon)
            daemon.start()
            daemon.add_iscsi("d0", portal, IQN, 1, user=user, password=password)
            daemon.export_fuse("fuse0", "d0", run / "disk.raw")
            self.replay(node, run / "disk.raw")
            elapsed = time.monotonic() - started
            daemon.stop()
            return elapsed

        return self.burst("direct", nodes, boot)

    def chap_env(self) -> dict[str, str]:
        env = dict(os.environ)
        assert self.cluster is not None
        if self.cluster.chap:
            env["LIBISCSI_CHAP_USERNAME"], env["LIBISCSI_CHAP_PASSWORD"] = self.cluster.chap
        return env

    def empty_nodes(self, nodes: Sequence[str]) -> None:
        """Destroy the instances and wait until every stack is gone (cold caches next)."""
        assert self.cluster is not None
        cluster = self.cluster
        for node in nodes:
            cluster.rpc(node, "destroy", f"vm-{node}")
        for node in nodes:
            cache = cluster.node_dir(node) / "state" / "cache"
            cluster.wait_for(
                lambda cache=cache: not any(cache.iterdir()),
                f"{node} to tear its stack down",
                timeout_s=120,
            )

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> list[Result]:
        args = self.args
        self.setup()
        assert self.cluster is not None
        nodes = self.cluster.node_names
        results = [self.vmthunder("single", "balanced", nodes[:1])]
        for variant in args.variants:
            if variant == "full":
                results.append(self.full_copy(nodes))
            elif variant == "direct":
                results.append(self.direct(nodes))
            elif variant in ("btree", "balanced"):
                results.append(self.vmthunder(variant, variant, nodes))
            elif variant == "prefetch":
                trace = self.prefetch_dir / f"{VOLUME}.trace.json"
                shutil.copyfile(self.trace_path, trace)
                try:
                    results.append(self.vmthunder("prefetch", "balanced", nodes))
                finally:
                    trace.unlink()
        return results

    def teardown(self) -> None:
        for daemon in self.direct_daemons:
            try:
                daemon.stop()
            except Exception as exc:
                say(f"teardown: {exc}")
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def report(results: list[Result], trace: boottrace.BootTrace) -> list[str]:
    single = next(r for r in results if r.variant == "single")
    lines = [
        "variant    nodes   p50 s   p99 s   max s  x single  image-server MB  peers MB  "
        "local-cache MB  fetched MB",
    ]
    for r in results:
        lines.append(
            f"{r.variant:<10} {r.nodes:>5} {r.p50:7.1f} {r.p99:7.1f} {max(r.times):7.1f} "
            f"{r.p99 / single.p99:9.2f} {r.image_server_sent / MB:16.1f} "
            f"{r.peers_sent / MB:9.1f} {r.local_served / MB:15.1f} {r.fetched / MB:11.1f}  "
            f"{' '.join(r.notes)}"
        )
    lines.append(
        f"boot read set {trace.read_bytes / MB:.1f} MB per VM ({trace.unique_bytes / MB:.1f} MB "
        "distinct), replayed boot traces; local-cache = the boot's re-reads, served locally"
    )
    return lines


def last_line(results: list[Result]) -> str:
    by = {r.variant: r for r in results}
    single = by["single"]
    vmt = by.get("balanced") or by.get("btree") or single
    full, direct = by.get("full"), by.get("direct")
    return (
        f"provision: nodes {vmt.nodes} vmthunder p99 {vmt.p99:.1f} s "
        f"({vmt.p99 / single.p99:.2f}x single), "
        f"full-copy p99 {full.p99 if full else float('nan'):.1f} s, "
        f"direct p99 {direct.p99 if direct else float('nan'):.1f} s, "
        f"image-server egress {vmt.image_server_sent / MB:.0f} MB vs "
        f"{(direct.image_server_sent if direct else 0) / MB:.0f} MB direct"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="provision.py",
        description="A burst of VM boots on N nodes: full copy, direct on demand, VMThunder "
        "(btree, balanced), side by side in one run. Run as root.",
    )
    parser.add_argument("--nodes", type=int, default=16, help="compute nodes (default 16)")
    parser.add_argument("--rate-mbit", type=float, default=1000, help="link rate (1000)")
    parser.add_argument("--guest", choices=["debian", "tiny"], default="debian")
    parser.add_argument(
        "--variants",
        default="full,direct,btree,balanced,prefetch",
        type=lambda text: [v for v in text.split(",") if v],
        help="comma-separated, from full,direct,btree,balanced,prefetch (single always runs)",
    )
    parser.add_argument("--workdir", default="/var/lib/vmthunder/provision")
    parser.add_argument("--cache-dir", default="/var/cache/vmthunder/guest")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--calibration", type=Path, help="write bench/simulate.py's calibration here"
    )
    parser.add_argument("--lab", default=LAB, help=f"namespace prefix (default {LAB})")
    parser.add_argument("--subnet", default=SUBNET, help=f"lab subnet (default {SUBNET})")
    parser.add_argument(
        "--tgt-base", type=int, default=TGT_BASE, help=f"tgtd control ports from ({TGT_BASE})"
    )
    args = parser.parse_args(argv)
    unknown = set(args.variants) - {"full", "direct", "btree", "balanced", "prefetch"}
    if unknown or not 1 <= args.nodes <= 60:
        parser.error(f"bad --variants {sorted(unknown)} or --nodes (1-60)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    try:
        results = bench.run()
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        bench.teardown()
    assert bench.trace is not None
    for line in report(results, bench.trace):
        print(line)
    if args.calibration:
        single = next(r for r in results if r.variant == "single")
        args.calibration.write_text(
            json.dumps(
                {
                    "boot_read_mib": bench.trace.read_bytes / (1 << 20),
                    "boot_cpu_s": bench.trace.issued_at[-1],
                    "single_vm_boot_s": single.p99,
                    "image_server_throughput_mbps": args.rate_mbit,
                    "relay_throughput_mbps": args.rate_mbit,
                },
                indent=1,
            )
        )
    if args.json:
        args.json.write_text(
            json.dumps([r.__dict__ | {"p50": r.p50, "p99": r.p99} for r in results], indent=1)
        )
    say(f"run took {time.monotonic() - started:.0f} s")
    print(last_line(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
