#!/usr/bin/env python3
"""The provisioning benchmark: a burst of VM boots on N nodes, side by side in one run.

One cluster (``vmt-demo/cluster.py``: volt-api, an image server and N compute nodes, each in
its own network namespace; the image server's link shaped with tc to ``--server-mbit`` and
every node's to ``--node-mbit``, both by default ``--rate-mbit``, 1 Gbit/s), one image (the
Debian guest of ``vmt-demo/debianguest.py``, or the tiny one with ``--guest tiny``), these
variants in turn, each from cold caches:

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
guests on this 2-core machine would measure the CPU instead. ``--real-boots K`` (K =
``--nodes``, ``balanced`` among the variants) adds, after the replays, a burst of K real VM
boots under libvirt/QEMU TCG (``bench/realboot.py``): every node boots one guest on its
VMThunder snapshot (default executor, cold caches, the same links), each timed from the
burst's start to its console's marker, reported separately as the ``real`` row. Then the
calibration line puts it beside the replay and ``bench/simulate.py``'s prediction for the
same N, calibrated as ``--calibration`` writes it (the sweep's code path)::

    provision: calibration nodes <K> real p99 <a> s, replay p99 <b> s, simulated p99 <c> s

For each variant: time until every VM booted (p50, p99, max, from the burst's start: stack
build + boot), image-server egress, bytes peers served, bytes served by local caches, and the
ratio to ``single``. The last line::

    provision: nodes <N> vmthunder p99 <t> s (<r>x single), full-copy p99 <t> s, direct p99
    <t> s, image-server egress <b> MB vs <b> MB direct

Sweep mode (``--sweep-nodes 2,4,8,16`` and/or ``--sweep-server-mbit 16,32``): one cluster of
the largest N; for each image-server link, ``single`` once, then every variant on the first N
nodes for each N. Writes every point to ``--json`` and a plot (``--plot``, PNG) of p99 boot
time against N per variant, with ``bench/simulate.py``'s prediction for the same parameters
(node and server links, boot read set, boot CPU time; its stack build time set so that its
single VM takes as long as the measured one) as dashed lines. Each point prints its own
last line as above; the sweep ends with::

    provision: sweep <k> points, nodes <N,...>, server <S,...> Mbit/s, plot <png>, json <json>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "vmt-demo"))
sys.path.insert(0, str(REPO / "bench"))

import boottrace  # noqa: E402
import debianguest  # noqa: E402
import guestimage  # noqa: E402
import realboot  # noqa: E402
import simulate  # noqa: E402
from cluster import PYTHON, ControlRpc, LocalCluster  # noqa: E402

from brick.netns import Lab  # noqa: E402
from brick.qsd.daemon import StorageDaemon  # noqa: E402

IMAGE = "image1"
VOLUME = f"volume-{IMAGE}"
IQN = f"iqn.2010-10.org.openstack:{VOLUME}"
LAB, SUBNET, TGT_BASE = "vmtp", "10.236.0.0/24", 3600
LAB_STATE = Path("/run/vmt-provision")
MB = 1_000_000
REAL_BOOT_TIMEOUT_S = 1200.0  # K Debian guests under TCG on 2 shared cores


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
    tcp_loss: dict[str, int] = field(default_factory=dict)  # every host's, summed (cluster.py)
    notes: list[str] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.times, 0.5) if self.times else math.nan  # nan: it failed

    @property
    def p99(self) -> float:
        return percentile(self.times, 0.99) if self.times else math.nan

    @property
    def slowest(self) -> float:
        return max(self.times, default=math.nan)


@dataclass
class Point:
    """One point of a sweep: every variant on ``nodes`` nodes behind one image-server link."""

    nodes: int
    server_mbit: float
    node_mbit: float
    results: list[Result]
    link_s: float = 0.0  # N x boot read set on the image server's link, s

    def as_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "server_mbit": self.server_mbit,
            "node_mbit": self.node_mbit,
            "link_s": self.link_s,
            "results": [result_json(r) for r in self.results],
        }


def result_json(r: Result) -> dict[str, Any]:
    return r.__dict__ | {"p50": r.p50, "p99": r.p99}


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
        self.real: realboot.RealBoots | None = None

    # -- setup -------------------------------------------------------------------------------
    def setup(self, nodes: int) -> None:
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
            nodes,
            name=args.lab,
            subnet=args.subnet,
            tgt_control_base=args.tgt_base,
            lab_state_dir=LAB_STATE,
            heartbeat_interval=2,
            node_timeout=30,
            nbd_tls=args.nbd_tls == "on",
            # every node may prefetch; only the prefetch variant puts a trace there
            extra_conf=f"prefetch_dir = {self.prefetch_dir}\n"
            + ("uplink_priority = true\n" if args.uplink_priority else ""),
            node_conf=self.uplink_conf(nodes),
            volt_conf=f"[balanced]\nfanout = {args.fanout}\n"
            + (
                f"image_server_fanout = {args.image_server_fanout}\n"
                if args.image_server_fanout
                else ""
            ),
        )
        cluster.start()
        self.shape(args.server_mbit)
        result = cluster.rpc("img", "create_image_target", IMAGE, str(image_file))
        if not str(result).startswith("0:"):
            raise RuntimeError(f"create_image_target: {result}")
        say(f"{nodes} nodes and an image server up")

    def uplink_conf(self, nodes: int) -> dict[str, str] | None:
        """With --uplink-priority every host shapes what it sends itself, at its link's
        rate (``uplink_mbit``); None without."""
        if not self.args.uplink_priority:
            return None
        rates = {"img": self.args.server_mbit}
        rates.update({f"n{i}": self.args.node_mbit for i in range(1, nodes + 1)})
        return {host: f"uplink_mbit = {int(rate)}\n" for host, rate in rates.items()}

    def shape(self, server_mbit: float) -> None:
        """The image server's link to ``server_mbit``, every node's to ``--node-mbit`` (tbf on
        both ends of each veth: each way; with --uplink-priority only the switch end's)."""
        assert self.cluster is not None
        cluster = self.cluster
        own = not self.args.uplink_priority  # else virtman shapes each host's egress
        burst = self.args.burst_kb
        cluster.lab.shape(cluster.hosts["img"], server_mbit, burst, host_egress=own)
        for node in cluster.node_names:
            cluster.lab.shape(cluster.hosts[node], self.args.node_mbit, burst, host_egress=own)
        say(
            f"links shaped: image server {server_mbit:g} Mbit/s, nodes "
            f"{self.args.node_mbit:g} Mbit/s, "
            + ("each way" if own else "received by the lab's tbf, sent by virtman's HTB")
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

    def tcp_loss(self) -> dict[str, int]:
        """Every host's TCP retransmissions and timeouts so far, summed: a starved or
        over-queued flow shows here before it shows in the boot times."""
        assert self.cluster is not None
        total: dict[str, int] = {}
        for host in ["img", *self.cluster.node_names]:
            for name, value in self.cluster.tcp_counters(host).items():
                total[name] = total.get(name, 0) + value
        return total

    def burst(self, variant: str, nodes: Sequence[str], boot: Callable[[str], float]) -> Result:
        """Run ``boot(node)`` on every node at once; each returns its time to booted."""
        drop_caches()
        before, loss_before = self.counters(), self.tcp_loss()
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
            tcp_loss={k: v - loss_before.get(k, 0) for k, v in self.tcp_loss().items()},
        )
        say(
            f"{variant:<9} p50 {result.p50:6.1f} s  p99 {result.p99:6.1f} s  max "
            f"{max(result.times):6.1f} s  image server {result.image_server_sent / MB:8.1f} MB"
            f"  TCP retransmitted {result.tcp_loss.get('retransmitted', 0)} segments, "
            f"{result.tcp_loss.get('timeouts', 0)} timeouts"
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
        rpc = ControlRpc(cluster, len(nodes))  # a client process per call would be timed too

        def boot(node: str) -> float:
            started = time.monotonic()
            answer = rpc(node, "create", f"vm-{node}", IMAGE, cluster.connection(VOLUME))
            if not str(answer).startswith("0:"):
                raise RuntimeError(f"create on {node}: {answer}")
            origin = cluster.node_dir(node) / "run" / "exports" / f"{VOLUME}.raw"
            self.replay(node, origin)
            return time.monotonic() - started

        with rpc:
            result = self.burst(variant, nodes, boot)
        depth = max((n["depth"] for n in cluster.volt_tree(VOLUME)), default=0)
        result.notes.append(f"tree depth {depth}")
        self.empty_nodes(nodes)
        return result

    def real_boots(self, nodes: Sequence[str]) -> Result:
        """Every node boots one real VM on its VMThunder snapshot, all at once."""
        assert self.cluster is not None and self.guest is not None
        cluster = self.cluster
        cluster.restart_volt(executor="balanced", fresh=True)
        real = self.real = realboot.RealBoots(
            cluster, self.guest, self.workdir, f"{self.args.lab}-", REAL_BOOT_TIMEOUT_S
        )
        result = self.burst(
            "real", nodes, lambda node: real.boot(node, f"vm-{node}", VOLUME, IMAGE)
        )
        depth = max((n["depth"] for n in cluster.volt_tree(VOLUME)), default=0)
        result.notes.append(f"tree depth {depth}")
        # a real guest's re-reads hit its own page cache: the trace's estimate does not apply
        result.local_served = 0
        result.notes.append("real VMs, local cache not counted")
        errors = real.destroy_vms()
        if errors:
            raise RuntimeError(f"real VMs not destroyed: {'; '.join(errors)}")
        self.empty_nodes(nodes)
        return result

    def full_copy(self, nodes: Sequence[str]) -> Result:
        assert self.cluster is not None
        cluster = self.cluster
        url = f"iscsi://{cluster.connection(VOLUME)['target_portal']}/{IQN}/1"

        def boot(node: str) -> float:
            started = time.monotonic()
            local = cluster.node_dir(node) / "full-copy.raw"
            try:
                copy = subprocess.run(
                    [*cluster.hosts[node].nsenter_argv(), "qemu-img", "convert", "-O", "raw",
                     "-f", "raw", url, str(local)],
                    env=self.chap_env(), capture_output=True, text=True, timeout=3600,
                    check=False,
                )  # fmt: skip
                if copy.returncode != 0:
                    raise RuntimeError(f"qemu-img convert: {copy.stderr.strip()[-300:]}")
                self.replay(node, local)
                return time.monotonic() - started
            finally:
                local.unlink(missing_ok=True)

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
        self.setup(self.args.nodes)
        assert self.cluster is not None
        nodes = self.cluster.node_names
        single = self.vmthunder("single", "balanced", nodes[:1])
        results = [single, *self.variants(nodes)]
        if self.args.real_boots:
            results.append(self.real_boots(nodes[: self.args.real_boots]))
        return results

    def sweep(self, measured: Callable[[list[Point]], None]) -> list[Point]:
        """Every variant at every (server link, N) point, on one cluster of the largest N;
        ``measured(points so far)`` after each point (an interrupted sweep keeps them)."""
        args = self.args
        self.setup(max(args.sweep_nodes))
        assert self.cluster is not None and self.trace is not None
        nodes = self.cluster.node_names
        points = []
        shaped = args.server_mbit
        for server_mbit in args.sweep_server_mbit:
            if server_mbit != shaped:
                self.shape(server_mbit)
                shaped = server_mbit
            single = self.vmthunder("single", "balanced", nodes[:1])
            for n in args.sweep_nodes:
                point = Point(n, server_mbit, args.node_mbit, [single, *self.variants(nodes[:n])])
                point.link_s = n * self.trace.read_bytes * 8 / (server_mbit * MB)
                say(
                    f"point: N x boot set on the server link {point.link_s:.1f} s = "
                    f"{point.link_s / single.p99:.2f}x single"
                )
                print(last_line(point.results), flush=True)
                points.append(point)
                measured(points)
        return points

    def variants(self, nodes: Sequence[str]) -> list[Result]:
        """Every variant on ``nodes``. A full copy that fails (over libiscsi, 16 copies on
        a 16 Mbit/s link fail) is a row without times, and the others still run: it leaves
        nothing behind, unlike a stack or a daemon that fails."""
        results = []
        for variant in self.args.variants:
            if variant == "full" and len(nodes) > self.args.full_max_nodes:
                say(f"full copy not run on {len(nodes)} nodes (--full-max-nodes)")
                results.append(Result("full", len(nodes), [], 0, 0, 0, 0, notes=["not run"]))
                continue
            try:
                results.append(self.variant(variant, nodes))
            except RuntimeError as exc:
                if variant != "full":
                    raise
                say(f"full copy failed: {exc}")
                failed = Result("full", len(nodes), [], 0, 0, 0, 0, notes=[f"failed: {exc}"])
                results.append(failed)
        return results

    def variant(self, variant: str, nodes: Sequence[str]) -> Result:
        if variant == "full":
            return self.full_copy(nodes)
        if variant == "direct":
            return self.direct(nodes)
        if variant in ("btree", "balanced"):
            return self.vmthunder(variant, variant, nodes)
        assert variant == "prefetch", variant
        trace = self.prefetch_dir / f"{VOLUME}.trace.json"
        shutil.copyfile(self.trace_path, trace)
        try:
            return self.vmthunder("prefetch", "balanced", nodes)
        finally:
            trace.unlink()

    def teardown(self) -> None:
        if self.real is not None:  # the VMs go before the stacks under them
            for error in self.real.close():
                say(f"teardown: {error}")
            self.real = None
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
        "local-cache MB  fetched MB  TCP retx/RTO",
    ]
    for r in results:
        lines.append(
            f"{r.variant:<10} {r.nodes:>5} {r.p50:7.1f} {r.p99:7.1f} {r.slowest:7.1f} "
            f"{r.p99 / single.p99:9.2f} {r.image_server_sent / MB:16.1f} "
            f"{r.peers_sent / MB:9.1f} {r.local_served / MB:15.1f} {r.fetched / MB:11.1f}  "
            f"{r.tcp_loss.get('retransmitted', 0):>7}/{r.tcp_loss.get('timeouts', 0):<4}  "
            f"{' '.join(r.notes)}"
        )
    lines.append(
        f"boot read set {trace.read_bytes / MB:.1f} MB per VM ({trace.unique_bytes / MB:.1f} MB "
        "distinct), replayed boot traces; local-cache = the boot's re-reads, served locally"
    )
    if any(r.variant == "real" for r in results):
        lines.append(
            "real = real VMs under libvirt/QEMU TCG on this machine's cores, burst start to "
            "console marker"
        )
    return lines


def calibration(
    results: Sequence[Result],
    trace: boottrace.BootTrace,
    server_mbit: float,
    node_mbit: float,
    fanout: int = 2,
    image_server_fanout: int | None = None,
) -> dict[str, Any] | None:
    """The real burst, the replay of the same boot and the simulation's p99 for that N
    (calibrated by the replayed single, as the sweep's overlay is); None without both."""
    by = {r.variant: r for r in results}
    real, replay = by.get("real"), by.get("balanced")
    if real is None or replay is None:
        return None
    point = Point(real.nodes, server_mbit, node_mbit, list(results))
    rows = simulated(trace, [point], ["balanced"], fanout, image_server_fanout)
    [row] = [r for r in rows if r["variant"] == "balanced"]
    return realboot.calibration_json(real.nodes, real.p99, replay.p99, row["p99"])


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


VARIANTS = ("full", "direct", "btree", "balanced", "prefetch")


# -- the simulation beside the measurement ---------------------------------------------------
# bench/simulate.py's spec for each variant here (virtman wakes its heartbeat after a build
# that left a parent pending, so the tree variants are the "+wake" ones).
SIM_SPECS = {
    "full": "fullcopy",
    "direct": "direct",
    "btree": "btree+wake",
    "balanced": "balanced+wake",
    "prefetch": "balanced+wake+prefetch",
}


def sim_params(
    trace: boottrace.BootTrace,
    server_mbit: float,
    node_mbit: float,
    single_s: float,
    fanout: int = 2,
    image_server_fanout: int | None = None,
) -> simulate.Params:
    """bench/simulate.py's model of this run: the links, the boot read set and CPU time of
    the trace, the image's size; the stack build time chosen so that the simulated single VM
    takes ``single_s`` (the measured one), as ``--single-vm-boot-s`` does for the CPU time."""
    params = simulate.Params(
        boot_read_mib=trace.read_bytes / simulate.MIB,
        boot_cpu_s=trace.issued_at[-1] if trace.issued_at else 0.0,
        image_gib=trace.image_size / simulate.GIB,
        node_mbps=node_mbit,
        server_mbps=server_mbit,
        stack_build_s=0.0,
        stack_jitter=0.0,
        fanout=fanout,
        image_server_fanout=image_server_fanout or 0,
    )
    build = max(0.0, single_s - simulate.single_vm_s(params))
    return replace(params, stack_build_s=build)


def simulated(
    trace: boottrace.BootTrace,
    points: Sequence[Point],
    variants: Sequence[str],
    fanout: int = 2,
    image_server_fanout: int | None = None,
) -> list[dict[str, Any]]:
    """The simulation's p99 at every point of the sweep, for every variant measured."""
    rows: list[dict[str, Any]] = []
    servers: set[float] = set()
    for point in points:
        single = next(r for r in point.results if r.variant == "single")
        params = sim_params(
            trace, point.server_mbit, point.node_mbit, single.p99, fanout, image_server_fanout
        )
        first = point.server_mbit not in servers  # one single row per image-server link
        servers.add(point.server_mbit)
        for variant in ["single", *variants] if first else variants:
            if variant == "single":
                result = simulate.simulate(params, "balanced", 1)
            else:
                result = simulate.simulate(params, SIM_SPECS[variant], point.nodes)
            rows.append(
                {
                    "variant": variant,
                    "nodes": 1 if variant == "single" else point.nodes,
                    "server_mbit": point.server_mbit,
                    "node_mbit": point.node_mbit,
                    "p99": result.p99_s,
                    "server_bytes": result.server_bytes,
                    "stack_build_s": params.stack_build_s,
                }
            )
    return rows


def plot(
    path: Path,
    points: Sequence[Point],
    sim_rows: Sequence[dict[str, Any]],
    variants: Sequence[str],
    title: str,
) -> None:
    """p99 boot time against N, one panel per image-server link: measured (solid, dots) and
    simulated (dashed) for every variant, and one VM alone (grey). Both axes are logarithmic
    when the times span more than 10x (full copy beside the rest): a line growing in
    proportion to N then has slope 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = sorted({p.server_mbit for p in points})
    fig, axes = plt.subplots(
        1, len(servers), figsize=(4.8 * len(servers) + 2.4, 4.8), squeeze=False, sharey=True
    )
    colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, server in zip(axes[0], servers, strict=True):
        mine = sorted((p for p in points if p.server_mbit == server), key=lambda p: p.nodes)
        ns = [p.nodes for p in mine]
        single = next(r for r in mine[0].results if r.variant == "single").p99
        ax.axhline(single, color="grey", linewidth=1, label=f"single (measured) {single:.1f} s")
        ax.axhline(1.3 * single, color="grey", linewidth=1, linestyle=":", label="1.3x single")
        for variant in variants:
            color = colors.get(variant, "black")
            measured = [next(r for r in p.results if r.variant == variant).p99 for p in mine]
            ax.plot(ns, measured, marker="o", color=color, label=f"{variant} (measured)")
            predicted = [
                row["p99"]
                for n in ns
                for row in sim_rows
                if row["variant"] == variant and row["nodes"] == n and row["server_mbit"] == server
            ]
            if len(predicted) == len(ns):
                ax.plot(
                    ns, predicted, linestyle="--", marker="x", color=color,
                    label=f"{variant} (simulated)",
                )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("nodes (one VM each)")
        ax.set_title(f"image server {server:g} Mbit/s, nodes {mine[0].node_mbit:g} Mbit/s")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("p99 boot time, s (burst start to booted)")
    times = [r.p99 for p in points for r in p.results] + [row["p99"] for row in sim_rows]
    times = [t for t in times if not math.isnan(t)]  # a variant that failed: no point
    if max(times) > 10 * min(times):
        axes[0][0].set_yscale("log")
    else:
        axes[0][0].set_ylim(bottom=0)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="provision.py",
        description="A burst of VM boots on N nodes: full copy, direct on demand, VMThunder "
        "(btree, balanced), side by side in one run. Run as root.",
    )
    parser.add_argument("--nodes", type=int, default=16, help="compute nodes (default 16)")
    parser.add_argument(
        "--rate-mbit", type=float, default=1000, help="every link's rate, Mbit/s (1000)"
    )
    parser.add_argument(
        "--server-mbit", type=float, help="the image server's link, Mbit/s (--rate-mbit)"
    )
    parser.add_argument("--node-mbit", type=float, help="each node's link, Mbit/s (--rate-mbit)")
    parser.add_argument(
        "--sweep-nodes",
        type=numbers(int),
        help="sweep: comma-separated N (e.g. 2,4,8,16); --nodes is then ignored",
    )
    parser.add_argument(
        "--sweep-server-mbit",
        type=numbers(float),
        help="sweep: comma-separated image-server links, Mbit/s (default --server-mbit)",
    )
    parser.add_argument(
        "--plot", type=Path, default=Path("provision-sweep.png"), help="sweep: the PNG plot"
    )
    parser.add_argument(
        "--replot", action="store_true", help="only draw --plot again from a sweep's --json"
    )
    parser.add_argument("--guest", choices=["debian", "tiny"], default="debian")
    parser.add_argument(
        "--variants",
        default="full,direct,btree,balanced,prefetch",
        type=lambda text: [v for v in text.split(",") if v],
        help="comma-separated, from full,direct,btree,balanced,prefetch (single always runs)",
    )
    parser.add_argument(
        "--full-max-nodes",
        type=int,
        default=60,
        metavar="K",
        help="full copy only on up to K nodes (it takes N x the image's link time); default 60",
    )
    parser.add_argument(
        "--fanout",
        type=int,
        default=2,
        choices=range(2, 65),
        metavar="K",
        help="Volt's [balanced] fanout: children per node, the image server included (2)",
    )
    parser.add_argument(
        "--image-server-fanout",
        type=int,
        choices=range(1, 65),
        metavar="K",
        help="Volt's [balanced] image_server_fanout: the image server's children (--fanout)",
    )
    parser.add_argument(
        "--nbd-tls",
        choices=("on", "off"),
        default="on",
        help="NBD between nodes with TLS and the cluster's pre-shared key (a node's default), "
        "or plain NBD (the nodes run with insecure_targets)",
    )
    parser.add_argument(
        "--uplink-priority",
        action="store_true",
        help="every host runs virtman's uplink_priority (its readers served in strict "
        "priority by arrival, docs/virtman.rst) and shapes its own egress with it "
        "(uplink_mbit = its link's rate; the lab's tbf then shapes only what it receives)",
    )
    parser.add_argument(
        "--burst-kb",
        type=int,
        default=512,
        help="the lab's tbf burst on each shaped link end, KB (512)",
    )
    parser.add_argument("--workdir", default="/var/lib/vmthunder/provision")
    parser.add_argument("--cache-dir", default="/var/cache/vmthunder/guest")
    parser.add_argument(
        "--json", type=Path, help="also write the results here (sweep: provision-sweep.json)"
    )
    parser.add_argument(
        "--calibration", type=Path, help="write bench/simulate.py's calibration here"
    )
    parser.add_argument(
        "--real-boots",
        type=int,
        default=0,
        metavar="K",
        help="after the replays, K real VMs at once under libvirt, one per node (K = --nodes, "
        "needs balanced in --variants: the replay they calibrate); default 0",
    )
    parser.add_argument("--lab", default=LAB, help=f"namespace prefix (default {LAB})")
    parser.add_argument("--subnet", default=SUBNET, help=f"lab subnet (default {SUBNET})")
    parser.add_argument(
        "--tgt-base", type=int, default=TGT_BASE, help=f"tgtd control ports from ({TGT_BASE})"
    )
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or not 1 <= args.nodes <= 60:
        parser.error(f"bad --variants {sorted(unknown)} or --nodes (1-60)")
    if args.real_boots and args.real_boots != args.nodes:
        parser.error(f"--real-boots {args.real_boots}: must be 0 or --nodes ({args.nodes})")
    if args.real_boots and "balanced" not in args.variants:
        parser.error("--real-boots: needs balanced in --variants (the replay it calibrates)")
    args.server_mbit = args.rate_mbit if args.server_mbit is None else args.server_mbit
    args.node_mbit = args.rate_mbit if args.node_mbit is None else args.node_mbit
    if min(args.rate_mbit, args.server_mbit, args.node_mbit) <= 0:
        parser.error("link rates must be > 0")
    if args.burst_kb <= 0:
        parser.error("--burst-kb must be > 0")
    args.sweep = bool(args.sweep_nodes or args.sweep_server_mbit)
    if args.replot and args.json is None:
        parser.error("--replot needs --json (a sweep's results)")
    if args.sweep:
        args.sweep_nodes = args.sweep_nodes or [args.nodes]
        args.sweep_server_mbit = args.sweep_server_mbit or [args.server_mbit]
        if not all(1 <= n <= 60 for n in args.sweep_nodes):
            parser.error("--sweep-nodes: each 1-60")
        if min(args.sweep_server_mbit) <= 0:
            parser.error("--sweep-server-mbit: each > 0")
        if args.json is None:
            args.json = Path("provision-sweep.json")
        if args.real_boots:
            parser.error("--real-boots: not with a sweep (one calibration point per run)")
    if args.uplink_priority:
        servers = args.sweep_server_mbit if args.sweep else [args.server_mbit]
        if len(servers) > 1:
            parser.error("--uplink-priority: one image-server rate per run (uplink_mbit)")
        if any(rate != int(rate) for rate in (*servers, args.node_mbit)):
            parser.error("--uplink-priority: link rates in whole Mbit/s (uplink_mbit)")
    return args


def numbers(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type: comma-separated numbers, sorted, without duplicates."""

    def parse(text: str) -> list[Any]:
        try:
            return sorted({kind(x) for x in text.split(",") if x.strip()})
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    if args.replot:
        replot(args.json, args.plot)
        say(f"plot {args.plot}")
        return 0
    if args.sweep:
        return run_sweep(args, bench, started)
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
    calibrated = calibration(
        results,
        bench.trace,
        args.server_mbit,
        args.node_mbit,
        args.fanout,
        args.image_server_fanout,
    )
    if calibrated:
        print(realboot.calibration_line(calibrated), flush=True)
    if args.calibration:
        single = next(r for r in results if r.variant == "single")
        args.calibration.write_text(
            json.dumps(
                {
                    "boot_read_mib": bench.trace.read_bytes / (1 << 20),
                    "boot_cpu_s": bench.trace.issued_at[-1],
                    "single_vm_boot_s": single.p99,
                    "image_server_throughput_mbps": args.server_mbit,
                    "relay_throughput_mbps": args.node_mbit,
                },
                indent=1,
            )
        )
    if args.json:
        rows = [
            result_json(r) | ({"calibration": calibrated} if r.variant == "real" else {})
            for r in results
        ]
        args.json.write_text(json.dumps(rows, indent=1))
    say(f"run took {time.monotonic() - started:.0f} s")
    print(last_line(results), flush=True)
    return 0


def replot(json_path: Path, png: Path) -> None:
    """Draw a sweep's plot again from its JSON."""
    data = json.loads(json_path.read_text())
    points = []
    for p in data["points"]:
        results = []
        for r in p["results"]:
            r = {k: v for k, v in r.items() if k not in ("p50", "p99")}
            results.append(Result(**r))
        point = Point(p["nodes"], p["server_mbit"], p["node_mbit"], results, p["link_s"])
        points.append(point)
    plot(png, points, data["simulated"], data["variants"][1:], data["title"])


def run_sweep(args: argparse.Namespace, bench: Bench, started: float) -> int:
    def save(points: list[Point]) -> None:  # after every point: a cut sweep keeps them
        assert bench.trace is not None
        write_sweep(args, bench.trace, points, complete=False)

    try:
        points = bench.sweep(save)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        bench.teardown()
    trace = bench.trace
    assert trace is not None
    for point in points:
        say(f"nodes {point.nodes}, image server {point.server_mbit:g} Mbit/s:")
        for line in report(point.results, trace):
            print(line)
    for row in write_sweep(args, trace, points, complete=True):
        say(
            f"simulated {row['variant']:<9} nodes {row['nodes']:>3} server "
            f"{row['server_mbit']:g} Mbit/s p99 {row['p99']:6.1f} s"
        )
    say(f"run took {time.monotonic() - started:.0f} s")
    print(
        f"provision: sweep {len(points)} points, nodes {','.join(map(str, args.sweep_nodes))}, "
        f"server {','.join(f'{s:g}' for s in args.sweep_server_mbit)} Mbit/s, plot "
        f"{args.plot}, json {args.json}",
        flush=True,
    )
    return 0


def write_sweep(
    args: argparse.Namespace, trace: boottrace.BootTrace, points: list[Point], *, complete: bool
) -> list[dict[str, Any]]:
    """The sweep's JSON and plot for the points so far, with the simulation's rows (which
    it returns); ``complete`` is False until the last point."""
    sim_rows = simulated(trace, points, args.variants, args.fanout, args.image_server_fanout)
    title = (
        f"bench/provision.py, guest {args.guest}, boot read set {trace.read_bytes / MB:.1f} MB\n"
        "measured (solid) and bench/simulate.py (dashed)"
    )
    partial = args.json.with_name(args.json.name + ".part")
    partial.write_text(
        json.dumps(
            {
                "title": title,
                "complete": complete,
                "guest": args.guest,
                "node_mbit": args.node_mbit,
                "variants": ["single", *args.variants],
                "boot_read_bytes": trace.read_bytes,
                "boot_cpu_s": trace.issued_at[-1] if trace.issued_at else 0.0,
                "image_bytes": trace.image_size,
                "points": [p.as_json() for p in points],
                "simulated": sim_rows,
            },
            indent=1,
        )
    )
    partial.replace(args.json)  # never a half-written file
    plot(args.plot, points, sim_rows, args.variants, title)
    return sim_rows


if __name__ == "__main__":
    sys.exit(main())
