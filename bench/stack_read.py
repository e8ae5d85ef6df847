#!/usr/bin/env python3
"""Read throughput of a compute node's block stack against the image server it reads from.

One run, one ``LocalCluster`` (``vmt-demo/cluster.py``) with one compute node ``n1``:

1. two image files of ``--size-mib`` random bytes (the second a copy of the first) are
   exported by the image server ``img`` (tgtd, CHAP);
2. for each pattern, three variants are measured one after the other, each after
   ``sync; echo 3 > /proc/sys/vm/drop_caches``:

   ``direct``
       the image server's iSCSI target read straight from the control namespace ``ctl``
       with userspace libiscsi (``qemu-img dd`` / ``qemu-io`` on an ``iscsi://`` URL; the
       CHAP account goes in ``LIBISCSI_CHAP_USERNAME`` / ``LIBISCSI_CHAP_PASSWORD``, never
       on a command line);
   ``cold``
       the node's whole stack, read from the root namespace through a fresh VM's qcow2
       overlay (overlay -> FUSE export -> copy-on-read -> qcow2 cache -> quorum -> iSCSI
       -> image server) with the node's cache empty;
   ``warm``
       the same reads again: the cache now holds every block read;
   ``relay``
       the node's NBD relay of the image (its warm stack) read from ``ctl`` with
       ``qemu-img dd`` / ``qemu-io`` on the NBD server, with TLS and the cluster's
       pre-shared key (``--nbd-tls on``, a node's default: ``tls-creds-psk``) or plain
       (``--nbd-tls off``: the nodes run with ``insecure_targets``). Compare two runs to
       see what TLS costs on the NBD hop between nodes.

   ``seq`` reads the whole image with ``qemu-img dd bs=--block-kib`` (one synchronous read
   at a time) into a file on tmpfs, whose sha256 must equal the image's. ``rand`` sends
   ``--random-count`` reads of ``--random-kib`` at distinct aligned offsets (fixed
   ``--seed``, the same offsets for all three variants) to ``qemu-io -r`` one at a time.
   The sequential passes use the first image and VM ``vm-seq``; the random ones the second
   image and VM ``vm-rand``, so the random cold pass starts from an empty cache too.
   ``--stack-cache none`` opens the overlay and its FUSE backing with O_DIRECT (as a VM
   with ``cache=none`` does) instead of through the page cache.

Since the page cache is dropped before every pass, ``direct`` and ``cold`` read the image
file from the image server's disk, and ``warm`` reads the node's cache file from its disk.

Figures are MB/s (10^6 bytes per second) over the tool's wall time minus its open cost
(the fastest of three runs that read 512 bytes, measured after the passes). Each pass also
records what the image server sent (``tx_bytes`` of ``img``): a cold or direct pass must
fetch at least 95 % of what it reads from it, a warm or relay pass almost nothing, and a
cache file must be empty before its cold pass; otherwise the run fails. After the table
comes each pass's CPU: the whole machine's busy seconds (``/proc/stat``) and per GB read,
and the long-lived processes that used most of them (tgtd, qemu-storage-daemon); busy
seconds close to the wall time on this 2-core machine mean a chain of waits, not a
CPU-bound pass (docs/benchmarks.rst). The last line is::

    stack_read: cold <x> warm <y> direct <z> relay <r> MB/s (NBD TLS on|off)

(the sequential figures). The exit status is non-zero on a data mismatch or a failed
check. Every packet goes between namespaces the run created (``direct`` runs inside
``ctl``); the root namespace only reads the FUSE-exported file, which is local I/O. The
cluster is always torn down (also on Ctrl-C / SIGTERM); the work directory is removed after
a successful run and kept (logs) after a failed one. Needs root. It is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import inspect
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brick import proc

REPO = Path(__file__).resolve().parent.parent
LAB_NAME = "vmtsr"  # namespaces vmtsr-img, vmtsr-n1, ...
SUBNET = "10.239.0.0/24"
IQN_PREFIX = "iqn.2010-10.org.openstack:"
IMAGES = ("stackread1", "stackread2")  # the node names them volume-<name>
MiB = 1 << 20
KiB = 1 << 10
MB = 1e6
COLD_MIN_UPSTREAM = 0.95  # a cold/direct pass fetches at least this share of what it reads
WARM_MAX_UPSTREAM = 0.05  # a warm pass fetches at most this share (+ WARM_SLACK): page
# cache readahead on the FUSE file can pull in a few blocks next to the random ones
WARM_SLACK = 1 * MiB  # heartbeats and iSCSI keep-alives
EMPTY_CACHE_MAX = 1 * MiB  # a qcow2 cache file with no data is ~200 KiB of metadata
OPEN_RUNS = 3
NBD_PORT = 10809  # a node's nbd_port (the default)
MARKER = ".stack_read"  # the work directory is emptied only if it holds this file
SHM, SHM_PREFIX = "/dev/shm", "stack_read-"  # tmpfs: where seq passes write what they read
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- small helpers ---------------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def loadavg() -> str:
    """The 1-, 5- and 15-minute load averages (other work skews every figure)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def write_random_image(path: Path, size: int) -> str:
    """``size`` random bytes into ``path`` (fsync'd); returns their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def cpu_busy_s() -> float:
    """Seconds of CPU the whole machine has spent busy (``/proc/stat``: all but idle, iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def process_cpu() -> dict[int, tuple[str, float]]:
    """``pid -> (command name, CPU seconds used so far)`` of every process now running."""
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (got := proc.stat(int(entry.name))) is not None:
            comm, fields = got  # utime and stime: proc(5) fields 14 and 15
            found[int(entry.name)] = (comm, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return found


def cpu_by_command(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per command name used since ``before`` by processes alive in both."""
    spent: dict[str, float] = {}
    for pid, (comm, now) in process_cpu().items():
        if pid in before and before[pid][0] == comm and now > before[pid][1]:
            spent[comm] = spent.get(comm, 0.0) + now - before[pid][1]
    return spent


def allocated(path: Path) -> int:
    """Bytes allocated on disk for ``path`` (0 if it does not exist)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (e.g. FUSE exports a killed run left behind)."""
    prefix = str(root.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        point = fields[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT/SIGTERM are ignored inside (teardown must not be cut short)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- what is read, and how -------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Something ``qemu-img dd`` / ``qemu-io`` can open: an iSCSI URL read inside a
    namespace, or a VM's overlay read from the root namespace."""

    name: str
    fmt: str
    target: str
    prefix: tuple[str, ...] = ()  # nsenter argv, or nothing for the root namespace
    env: dict[str, str] | None = None
    force_share: bool = False  # -U: the overlay's backing is held by the node's daemons
    direct_io: bool = False  # O_DIRECT on the overlay and its backing (a VM's cache=none)
    objects: tuple[str, ...] = ()  # --object definitions (TLS credentials)
    image_opts: bool = False  # target is an --image-opts string (an NBD server with TLS)

    def _run(self, argv: Sequence[str], stdin: str | None, timeout_s: float) -> float:
        full = [*self.prefix, *argv]
        started = time.perf_counter()
        proc = subprocess.run(
            full,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout_s,
            check=False,
        )
        elapsed = time.perf_counter() - started
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "failed" in out:
            raise RuntimeError(
                f"{argv[0]} on {self.name} exited {proc.returncode}: {out.strip()[-600:]}"
            )
        return elapsed

    def dd(self, out: Path, block: int, timeout_s: float, count: int | None = None) -> float:
        """Seconds ``qemu-img dd`` takes to copy the source (or ``count`` blocks) to ``out``."""
        argv = ["qemu-img", "dd", *(["-U"] if self.force_share else [])]
        argv += [a for obj in self.objects for a in ("--object", obj)]
        if self.image_opts:
            argv += ["--image-opts", "-O", "raw", f"bs={block}", f"if={self.target}"]
        elif self.direct_io:  # qemu-img dd has no -t: the cache mode goes in the options
            opts = f"driver={self.fmt},file.driver=file,file.filename={self.target}"
            argv += ["--image-opts", "-O", "raw", f"bs={block}", f"if={opts},cache.direct=on"]
        else:
            argv += ["-f", self.fmt, "-O", "raw", f"bs={block}", f"if={self.target}"]
        argv.append(f"of={out}")
        if count is not None:
            argv.append(f"count={count}")
        try:
            return self._run(argv, None, timeout_s)
        finally:
            if count is not None:
                out.unlink(missing_ok=True)

    def reads(self, offsets: Sequence[int], length: int, timeout_s: float) -> float:
        """Seconds ``qemu-io -r`` takes for one synchronous read per offset, in order."""
        argv = ["qemu-io", "-r", *(["-U"] if self.force_share else [])]
        argv += [a for obj in self.objects for a in ("--object", obj)]
        argv += ["--image-opts"] if self.image_opts else ["-f", self.fmt]
        if self.direct_io:
            argv += ["-t", "none"]
        argv.append(self.target)
        commands = "".join(f"read -q {off} {length}\n" for off in offsets)
        return self._run(argv, commands, timeout_s)


@dataclass
class Pass:
    pattern: str  # seq | rand
    variant: str  # direct | cold | warm | relay
    source: Source
    nbytes: int
    wall_s: float = 0.0
    open_s: float = 0.0
    upstream: int = 0
    cache_growth: int = 0  # bytes the node's cache file grew by during the pass
    cpu_s: float = 0.0  # the machine's busy CPU seconds during the pass
    cpu_daemons: dict[str, float] = field(default_factory=dict)  # long-lived processes' share
    check: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def net_s(self) -> float:
        return max(self.wall_s - self.open_s, 1e-6)

    @property
    def mbps(self) -> float:
        return self.nbytes / MB / self.net_s


# -- the run ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, cluster: Any, workdir: Path, shm: Path):
        self.args = args
        self.cluster = cluster
        self.workdir = workdir
        self.shm = shm
        self.size = args.size_mib * MiB
        self.block = args.block_kib * KiB
        self.rblock = args.random_kib * KiB
        blocks = self.size // self.rblock
        count = args.random_count or max(1, blocks // 4)
        rng = random.Random(args.seed)
        self.offsets = [b * self.rblock for b in rng.sample(range(blocks), count)]
        self.timeout_s = 120.0 + args.size_mib  # >= 1 MiB/s worst case
        self.passes: list[Pass] = []
        self.image_files: dict[str, Path] = {}
        self.sha: str = ""

    # -- set-up ----------------------------------------------------------------------------
    def make_images(self) -> None:
        first = self.workdir / f"{IMAGES[0]}.raw"
        started = time.monotonic()
        self.sha = write_random_image(first, self.size)
        second = self.workdir / f"{IMAGES[1]}.raw"
        shutil.copyfile(first, second)
        with open(second, "rb+") as f:
            os.fsync(f.fileno())
        self.image_files = {IMAGES[0]: first, IMAGES[1]: second}
        print(
            f"images: 2 x {self.args.size_mib} MiB random (sha256 {self.sha[:16]}...) "
            f"in {time.monotonic() - started:.1f} s"
        )

    def export(self, image: str) -> None:
        result = self.cluster.rpc(
            "img", "create_image_target", image, str(self.image_files[image]), None, IQN_PREFIX
        )
        if not str(result).startswith("0:"):
            raise RuntimeError(f"create_image_target {image}: {result}")

    def direct_source(self, image: str) -> Source:
        conn = self.cluster.connection(f"volume-{image}")
        url = f"iscsi://{conn['target_portal']}/{conn['target_iqn']}/{conn['target_lun']}"
        env = dict(os.environ)
        if self.cluster.chap:
            env["LIBISCSI_CHAP_USERNAME"], env["LIBISCSI_CHAP_PASSWORD"] = self.cluster.chap
        prefix = tuple(self.cluster.hosts["ctl"].nsenter_argv())
        return Source(f"direct {image}", "raw", url, prefix, env)

    def relay_source(self, image: str) -> Source:
        """n1's NBD relay of ``image`` (its warm stack) read from ``ctl``: with TLS and the
        cluster's key (--nbd-tls on), or plain."""
        host = self.cluster.hosts["n1"].address
        export = f"volume-{image}"
        prefix = tuple(self.cluster.hosts["ctl"].nsenter_argv())
        psk_file = getattr(self.cluster, "psk_file", None)
        if psk_file is None:
            return Source(f"relay {image}", "raw", f"nbd://{host}:{NBD_PORT}/{export}", prefix)
        creds = (
            f"tls-creds-psk,id=tls0,endpoint=client,dir={psk_file.parent},"
            f"username={self.cluster.psk_identity}"
        )
        opts = (
            f"driver=nbd,server.type=inet,server.host={host},server.port={NBD_PORT},"
            f"export={export},tls-creds=tls0"
        )
        return Source(f"relay {image}", "raw", opts, prefix, objects=(creds,), image_opts=True)

    def create_vm(self, instance: str, image: str) -> Source:
        conn = self.cluster.connection(f"volume-{image}")
        started = time.monotonic()
        result = str(self.cluster.rpc("n1", "create", instance, image, conn, None))
        if not result.startswith("0:"):
            raise RuntimeError(f"create {instance} on n1: {result}")
        overlay = result.partition(":")[2]
        print(f"{instance}: {overlay} ({time.monotonic() - started:.2f} s)")
        direct_io = self.args.stack_cache == "none"
        return Source(
            f"{instance} overlay", "qcow2", overlay, force_share=True, direct_io=direct_io
        )

    def cache_file(self, image: str) -> Path:
        """The node's qcow2 cache of ``image`` (the qemu driver's naming)."""
        return self.cluster.node_dir("n1") / "state" / "cache" / f"volume-{image}.qcow2"

    # -- passes ----------------------------------------------------------------------------
    def run_pass(self, pattern: str, variant: str, source: Source, image: str) -> Pass:
        nbytes = self.size if pattern == "seq" else len(self.offsets) * self.rblock
        p = Pass(pattern, variant, source, nbytes)
        before = allocated(self.cache_file(image))
        if variant == "cold" and before > EMPTY_CACHE_MAX:
            p.problems.append(f"cache of {image} holds {before / MiB:.1f} MiB before cold")
        drop_caches()
        tx0 = self.cluster.tx_bytes("img")
        procs0, busy0 = process_cpu(), cpu_busy_s()
        if pattern == "seq":
            out = self.shm / f"{pattern}-{variant}.raw"
            try:
                p.wall_s = source.dd(out, self.block, self.timeout_s)
                p.cpu_s, p.cpu_daemons = cpu_busy_s() - busy0, cpu_by_command(procs0)
                got = sha256_file(out)
            finally:
                out.unlink(missing_ok=True)
            if got == self.sha:
                p.check = "sha256 ok"
            else:
                p.check = "SHA256 MISMATCH"
                p.problems.append(f"{pattern} {variant}: sha256 {got} != image {self.sha}")
        else:
            p.wall_s = source.reads(self.offsets, self.rblock, self.timeout_s)
            p.cpu_s, p.cpu_daemons = cpu_busy_s() - busy0, cpu_by_command(procs0)
            p.check = "ok"
        p.upstream = self.cluster.tx_bytes("img") - tx0
        if variant != "direct":
            p.cache_growth = allocated(self.cache_file(image)) - before
        if variant in ("direct", "cold") and p.upstream < COLD_MIN_UPSTREAM * nbytes:
            p.problems.append(
                f"{pattern} {variant}: the image server sent only {p.upstream / MiB:.1f} MiB "
                f"for {nbytes / MiB:.1f} MiB read (not cold?)"
            )
        if variant in ("warm", "relay") and p.upstream > WARM_MAX_UPSTREAM * nbytes + WARM_SLACK:
            p.problems.append(
                f"{pattern} {variant}: the image server sent {p.upstream / MiB:.1f} MiB (not warm?)"
            )
        if p.problems and p.check in ("ok", "sha256 ok"):
            p.check += ", CHECK FAILED"
        print(
            f"  {pattern:4} {variant:6} {p.wall_s:7.3f} s  upstream {p.upstream / MiB:7.1f} MiB"
            f"  {p.check}",
            flush=True,
        )
        self.passes.append(p)
        return p

    def open_cost(self, source: Source, pattern: str) -> float:
        """Seconds a run that opens ``source`` and reads 512 bytes takes (best of three)."""
        runs = []
        for _ in range(OPEN_RUNS):
            if pattern == "seq":
                runs.append(source.dd(self.shm / "open.raw", 512, self.timeout_s, count=1))
            else:
                runs.append(source.reads([0], 512, self.timeout_s))
        return min(runs)  # noise only adds time

    def run(self) -> None:
        self.make_images()
        for image in IMAGES:
            self.export(image)
        print(f"exported {', '.join(IMAGES)} from img ({self.cluster.hosts['img'].address})")
        sequential = [
            ("direct", self.direct_source(IMAGES[0])),
            ("cold", self.create_vm("vm-seq", IMAGES[0])),
        ]
        sequential.append(("warm", sequential[1][1]))
        sequential.append(("relay", self.relay_source(IMAGES[0])))
        for variant, source in sequential:
            self.run_pass("seq", variant, source, IMAGES[0])
        randoms = [
            ("direct", self.direct_source(IMAGES[1])),
            ("cold", self.create_vm("vm-rand", IMAGES[1])),
        ]
        randoms.append(("warm", randoms[1][1]))
        randoms.append(("relay", self.relay_source(IMAGES[1])))
        for variant, source in randoms:
            self.run_pass("rand", variant, source, IMAGES[1])
        costs: dict[tuple[str, str], float] = {}
        for p in self.passes:
            key = (p.pattern, p.source.name)
            if key not in costs:
                costs[key] = self.open_cost(p.source, p.pattern)
            p.open_s = costs[key]

    # -- report ----------------------------------------------------------------------------
    def report(self) -> list[str]:
        print()
        print(
            f"{'pattern':<14} {'variant':<7} {'MiB':>7} {'wall s':>8} {'open ms':>8} "
            f"{'MB/s':>8} {'upstream MiB':>13} {'cache +MiB':>11}  check"
        )
        for p in self.passes:
            label = (
                f"seq {self.args.block_kib} KiB"
                if p.pattern == "seq"
                else f"rand {self.args.random_kib} KiB"
            )
            print(
                f"{label:<14} {p.variant:<7} {p.nbytes / MiB:>7.1f} {p.wall_s:>8.3f} "
                f"{p.open_s * 1e3:>8.1f} {p.mbps:>8.1f} {p.upstream / MiB:>13.1f} "
                f"{p.cache_growth / MiB:>11.1f}  {p.check}"
            )
        print()
        print("CPU per pass (the whole machine's busy seconds, per GB read; then the long-lived")
        print("processes that used the most of it; the rest is the reader and the kernel):")
        for p in self.passes:
            top = sorted(p.cpu_daemons.items(), key=lambda kv: -kv[1])[:4]
            shares = ", ".join(f"{comm} {spent:.2f}" for comm, spent in top)
            print(
                f"  {p.pattern:4} {p.variant:6} {p.cpu_s:6.2f} s  "
                f"{p.cpu_s / (p.nbytes / 1e9):6.2f} s/GB  ({shares})"
            )
        return [problem for p in self.passes for problem in p.problems]

    def figure(self, pattern: str, variant: str) -> float:
        return next(p.mbps for p in self.passes if (p.pattern, p.variant) == (pattern, variant))


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Read throughput of a node's block stack (cold / warm cache) against "
        "direct iSCSI reads of the image server, in one LocalCluster with one node.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size-mib", type=int, default=256, help="size of the image")
    parser.add_argument("--block-kib", type=int, default=1024, help="sequential read size")
    parser.add_argument("--random-kib", type=int, default=64, help="random read size")
    parser.add_argument(
        "--random-count",
        type=int,
        default=0,
        help="random reads (distinct offsets); 0: a quarter of the image's blocks",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random offsets")
    parser.add_argument(
        "--stack-cache",
        choices=("writeback", "none"),
        default="writeback",
        help="cache mode of the stack reads: writeback (through the page cache, qemu's "
        "default) or none (O_DIRECT on the overlay and the FUSE file, as a VM with "
        "cache=none)",
    )
    parser.add_argument(
        "--nbd-tls",
        choices=("on", "off"),
        default="on",
        help="NBD relays with TLS and the cluster's pre-shared key (the default of a node), "
        "or plain NBD (nodes with insecure_targets); the relay pass reads n1's NBD relay",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/vmt-stack-read"),
        help="work directory (emptied first; images, caches, logs)",
    )
    parser.add_argument(
        "--tgt-control-base",
        type=int,
        default=3700,
        help="first tgtd control port (socket /var/run/tgtd/socket.N is shared by all "
        "namespaces: keep it apart from other clusters' ports)",
    )
    parser.add_argument(
        "--lab",
        default=LAB_NAME,
        help="lab name: namespaces <lab>-img, <lab>-n1, ... (distinct per concurrent run)",
    )
    parser.add_argument("--subnet", default=SUBNET, help="the lab's subnet")
    parser.add_argument(
        "--node-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra [DEFAULT] option of the node's virtman.conf (repeatable), e.g. "
        "qemu_fuse_readahead_kib=128 to measure a setting against its default",
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the work directory after success"
    )
    args = parser.parse_args(argv)
    for line in args.node_conf:
        if "=" not in line or "\n" in line:
            parser.error(f"--node-conf {line!r}: must be KEY=VALUE on one line")
    for name in ("size_mib", "block_kib", "random_kib"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.random_count < 0:
        parser.error("--random-count must be >= 0")
    size = args.size_mib * MiB
    for name in ("block_kib", "random_kib"):
        if size % (getattr(args, name) * KiB):
            parser.error(f"--size-mib must be a multiple of --{name.replace('_', '-')}")
    if args.random_count > size // (args.random_kib * KiB):
        parser.error("--random-count is more than the image's distinct --random-kib blocks")
    return args


def preflight(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SystemExit("stack_read: needs root (network namespaces, drop_caches)")
    missing = [
        t
        for t in ("qemu-img", "qemu-io", "qemu-storage-daemon", "tgtd", "nsenter")
        if shutil.which(t) is None
    ]
    if missing:
        raise SystemExit(f"stack_read: missing tools: {', '.join(missing)}")
    size = args.size_mib * MiB
    if shutil.disk_usage(SHM).free < size + 64 * MiB:
        raise SystemExit("stack_read: /dev/shm has no room for one copy of the image")
    args.workdir.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.workdir.parent).free < 4 * size + 256 * MiB:
        raise SystemExit(f"stack_read: {args.workdir.parent} has no room for 2 images + caches")


def clean_workdir(workdir: Path, lab: str) -> None:
    """Remove what a previous (killed) run left: its lab, stale FUSE mounts, its files."""
    from brick.netns import Lab

    marker = workdir / MARKER
    if workdir.exists() and any(workdir.iterdir()) and not marker.exists():
        raise SystemExit(f"stack_read: {workdir} is not empty and not a stack_read work dir")
    if Lab.cleanup(lab, workdir / "lab"):
        print(f"removed the namespaces a previous run left ({workdir / 'lab'})")
    for point in reversed(mounts_under(workdir)):
        print(f"unmounting stale mount {point}")
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    for stale in Path(SHM).glob(SHM_PREFIX + "*"):  # a killed run's (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    marker.write_text("made by bench/stack_read.py: emptied by its next run\n")


def make_cluster(args: argparse.Namespace) -> Any:
    from cluster import LocalCluster

    kwargs: dict[str, Any] = {"name": args.lab, "subnet": args.subnet}
    if args.node_conf:
        kwargs["extra_conf"] = "".join(
            f"{line.replace('=', ' = ', 1)}\n" for line in args.node_conf
        )
    if "nbd_tls" in inspect.signature(LocalCluster).parameters:
        kwargs["nbd_tls"] = args.nbd_tls == "on"
    elif args.nbd_tls == "on":
        raise SystemExit("stack_read: this LocalCluster has no nbd_tls: use --nbd-tls off")
    if "tgt_control_base" in inspect.signature(LocalCluster).parameters:
        kwargs["tgt_control_base"] = args.tgt_control_base
    else:
        print("note: LocalCluster has no tgt_control_base: tgtd uses control ports 3300+")
    return LocalCluster(args.workdir, 1, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preflight(args)
    sys.path[:0] = [str(REPO), str(REPO / "vmt-demo")]
    lock_path = args.workdir.with_name(args.workdir.name + ".lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"stack_read: another run holds {lock_path}") from None
        signal.signal(signal.SIGTERM, _sigterm)
        return run(args)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    clean_workdir(args.workdir, args.lab)
    shm = Path(tempfile.mkdtemp(prefix=SHM_PREFIX, dir=SHM))
    problems: list[str] = []
    try:
        cluster = make_cluster(args)
        print(
            f"stack_read: {args.size_mib} MiB image, seq {args.block_kib} KiB, "
            f"rand {args.random_kib} KiB, seed {args.seed}, stack cache {args.stack_cache}, "
            f"NBD TLS {args.nbd_tls}; "
            f"kernel {platform.release()}, "
            f"{os.cpu_count()} CPUs, load {loadavg()}"
        )
        try:
            t0 = time.monotonic()
            cluster.start()
            print(f"cluster up in {time.monotonic() - t0:.1f} s (lab {args.lab}, {args.subnet})")
            bench = Bench(args, cluster, args.workdir, shm)
            print(f"random: {len(bench.offsets)} reads of {args.random_kib} KiB")
            bench.run()
        except BaseException:
            print(f"stack_read: failed; work directory kept: {args.workdir}", file=sys.stderr)
            raise
        finally:
            with signals_ignored():
                t0 = time.monotonic()
                cluster.close()
                print(f"cluster torn down in {time.monotonic() - t0:.1f} s")
                left = mounts_under(args.workdir)
                if left:
                    problems.append(f"mounts left under {args.workdir} after teardown: {left}")
                    for point in reversed(left):
                        subprocess.run(["umount", "-l", point], check=False)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    problems += bench.report()
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    if problems:
        print(f"work directory kept: {args.workdir}")
    elif not args.keep_workdir:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"run time {time.monotonic() - started:.1f} s (load {loadavg()})")
    print(
        f"stack_read: cold {bench.figure('seq', 'cold'):.1f} "
        f"warm {bench.figure('seq', 'warm'):.1f} "
        f"direct {bench.figure('seq', 'direct'):.1f} "
        f"relay {bench.figure('seq', 'relay'):.1f} MB/s (NBD TLS {args.nbd_tls})"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("stack_read: interrupted (cluster torn down)", file=sys.stderr)
        sys.exit(130)
