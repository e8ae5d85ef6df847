"""Chaos run on the local cluster: daemons SIGKILLed and links cut under VMs' disk I/O.

One ``LocalCluster`` (``vmt-demo/cluster.py``, qemu driver): volt-api, an image server and
``--nodes`` compute nodes, each in its own network namespace. One random image is exported
by the image server; every node gets ``--vms-per-node`` instances through the ``create``
XML-RPC. Each instance's disk (its qcow2 overlay, whose backing is the node's FUSE origin)
is opened the way a VM's QEMU opens it: by a qemu-storage-daemon of this run (one per
instance, in the root namespace: it only opens local files) that exports it as a raw FUSE
file. A worker thread per disk reads and writes that file with O_DIRECT, 64 KiB blocks at
random offsets: a write puts a block derived from (instance, block, generation) and
fdatasyncs it; a read checks the block against the image's bytes (never written: those
come through the node's cache and its paths from its parents) or against the last write.
Half of the reads scan the disk from a random start, so that a node keeps fetching blocks
it has not cached from its parents while the faults happen (the image is large enough,
``--image-mib``, for the scans not to finish during the run).

Each round picks (seeded) one fault and a host: SIGKILL of ``virtmanserver``, ``qsd`` (the
node's qemu-storage-daemon), ``tgtd`` (a compute node's relay target or the image server's
target), ``volt-api``, or ``link`` (``ip link set eth0 down`` in the host's namespace).
PIDs come from the cluster's records and the nodes' pidfiles, checked against the host's
namespace. After ``--hold-s`` seconds under load the fault is undone the way an operator
would: virtmanserver (and volt-api) started again; the link set up again. A killed qsd or
tgtd is not touched: the node's virtmanserver notices (``daemon_check_interval``), starts
it again and rebuilds what lived in it (the stacks from their cache files, the relays, the
image server's targets from its journal). The round ends
when the cluster is healthy: every host runs its qsd and tgtd, the image server exports the
image, every node's ``list()`` answers with its instances, Volt's
tree holds every node and every non-top node has parents in the tree, every node's paths
file is non-empty and names peers of the tree (in Volt's order) or the image server, the
nodes do not read from each other in a cycle, and every disk has completed a read since
the restore.

What a reader may expect (the semantics this run checks):

- A node's qemu-storage-daemon holds its whole stack (paths, cache, the FUSE origin the
  overlays are backed by). SIGKILLing it is a crash of that node's storage: a VM on that
  node sees EIO on blocks its overlay does not hold (a real QEMU would too) and needs a
  restart once the stack is rebuilt, because its open backing file is on the dead FUSE
  mount. So the disks of that node are "restarted" (their qemu-storage-daemon stopped and
  started again on the same overlay) after the node is healthy, and their errors between
  the kill and that restart are counted apart as outage errors, not in E. The overlay is
  a local file of the VM's own process: every write acknowledged before the crash must
  still be there.
- Everything else must be invisible to every reader: a killed virtmanserver, tgtd or
  volt-api, any fault on a parent (children fail over to another path or reconnect), and
  a cut link, the node's own included (a read of a block it has not cached waits for the
  link: TCP sees no reset, so neither NBD nor libiscsi gives up within ``--hold-s``).
  Each error there counts in E, and so does an I/O that hangs longer than
  ``--io-timeout-s`` (counted once when the timeout passes).

At the end every disk is read whole and compared with the image plus its own writes
(a write that failed may or may not have landed: either content is accepted); L counts
the bytes that match neither. Then the cluster is closed and checked: no process left in
its namespaces once its daemons stopped, no qemu-storage-daemon or tgtd of the run, no
FUSE mount, pidfile, socket, path, export, cache or instance file in the nodes' run and
state directories, the namespaces gone. Last line::

    chaos: <R> rounds, <K> kills, <E> reader I/O errors, <L> lost or wrong bytes, <S> s

Exit status 0 only if E == 0, L == 0, every round became healthy and nothing leaked.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "vmt-demo")]

from cluster import Daemon, LocalCluster  # noqa: E402

from brick.netns import Lab, list_netns  # noqa: E402

IMAGE = "volume-image1"
BLOCK = 64 << 10
MARKER = ".vmt-chaos"
FAULTS = ("virtmanserver", "qsd", "tgtd", "volt-api", "link")
OUTAGE_FAULTS = ("qsd",)  # the faulted node's own disks may fail (see above)
# A node's shutdown is bounded by its heartbeat thread's join (30 s), the children's grace
# period and the forced teardown (120 s, virtman.compute): beyond this, it hangs.
STOP_TIMEOUT_S = 180.0


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


def content(disk: str, block: int, generation: int, image: bytes) -> bytes:
    """What a block holds at ``generation`` (0: the image's bytes)."""
    if generation == 0:
        return image[block * BLOCK : (block + 1) * BLOCK]
    return hashlib.shake_256(f"{disk}:{block}:{generation}".encode()).digest(BLOCK)


def differing(a: bytes, b: bytes) -> int:
    if len(a) != len(b):
        return max(len(a), len(b))
    return sum(x != y for x, y in zip(a, b, strict=True))


# -- a VM's disk -------------------------------------------------------------------------------
@dataclass
class Counters:
    ops: int = 0
    reads: int = 0
    writes: int = 0
    errors: int = 0  # E
    outage_errors: int = 0  # on a node whose own storage daemon was killed
    wrong_bytes: int = 0  # L
    hangs: int = 0
    first_reads: int = 0  # of blocks never read before on this disk
    faulted_reads: int = 0  # completed while a fault was on (or not yet healed)


@dataclass
class Disk:
    """One instance's disk, opened by our own qemu-storage-daemon as a VM's QEMU would."""

    name: str
    node: str
    overlay: Path
    mount: Path
    image: bytes
    rng: random.Random
    write_share: float
    pace_s: float
    c: Counters = field(default_factory=Counters)
    # block -> generations its content may be (a failed write may or may not have landed)
    expect: dict[int, tuple[int, ...]] = field(default_factory=dict)
    outage: bool = False
    faulted: threading.Event = field(default_factory=threading.Event)  # shared by all disks
    seen: set[int] = field(default_factory=set)
    op_started: float | None = None
    hang_counted: bool = False
    last_read: float = 0.0  # when a read last succeeded
    proc: subprocess.Popen[bytes] | None = None
    fd: int | None = None
    io_lock: threading.Lock = field(default_factory=threading.Lock)
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    log: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return len(self.image) // BLOCK

    # life cycle
    def open(self) -> None:
        self.mount.touch()
        argv = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=qcow2,node-name=disk,file.driver=file,file.filename={self.overlay}",
            "--export",
            f"type=fuse,id=disk,node-name=disk,mountpoint={self.mount},writable=on",
        ]
        log = open(self.mount.with_suffix(".log"), "ab")  # noqa: SIM115 (kept by the Popen)
        with log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while str(self.mount) not in mounts_under(self.mount.parent):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: qemu-storage-daemon did not export the disk")
            time.sleep(0.05)
        self.fd = os.open(self.mount, os.O_RDWR | os.O_DIRECT)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if str(self.mount) in mounts_under(self.mount.parent):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False)
        self.mount.unlink(missing_ok=True)
        self.mount.with_suffix(".log").unlink(missing_ok=True)

    def reopen(self, timeout_s: float) -> None:
        """The VM's restart after its node's storage crashed (see the module docstring)."""
        if not self.io_lock.acquire(timeout=timeout_s):
            self.error("an I/O hangs: the disk cannot be restarted")
            return
        try:
            self.close()
            self.open()
            self.outage = False
        finally:
            self.io_lock.release()

    # I/O
    def start_load(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=f"io-{self.name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        cursor = self.rng.randrange(self.blocks)
        while not self.stop_event.is_set():
            with self.io_lock:
                draw = self.rng.random()
                if draw < self.write_share:
                    self._write(self.rng.randrange(self.blocks))
                elif draw < (1 + self.write_share) / 2:
                    # Half the reads scan the disk from a random start: blocks this node
                    # has not cached yet, fetched from its parents while the faults happen.
                    if cursor not in self.seen:
                        self.c.first_reads += 1
                    self.check(cursor)
                    cursor = (cursor + 1) % self.blocks
                else:
                    self.check(self.rng.randrange(self.blocks))
            self.stop_event.wait(self.pace_s)

    def _io(self, what: str, block: int, fn: Any) -> Any:
        assert self.fd is not None
        self.op_started = time.monotonic()
        try:
            result = fn()
        except OSError as exc:
            self.error(f"{what} block {block}: {exc}")
            return None
        finally:
            self.op_started = None
            self.hang_counted = False
        self.c.ops += 1
        return result

    def error(self, what: str) -> None:
        kind = "outage error" if self.outage else "I/O ERROR"
        if self.outage:
            self.c.outage_errors += 1
        else:
            self.c.errors += 1
        self.note(f"{kind}: {what}")

    def note(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {self.name}@{self.node} {text}"
        self.log.append(line)
        if not self.outage:
            print(line, flush=True)

    def _write(self, block: int) -> None:
        old = self.expect.get(block, (0,))
        generation = max(old) + 1
        buf = mmap.mmap(-1, BLOCK)
        buf.write(content(self.name, block, generation, self.image))
        fd = self.fd

        def write() -> int:
            n = os.pwritev(fd, [buf], block * BLOCK)
            os.fdatasync(fd)
            return n

        if self._io("write", block, write) == BLOCK:
            self.expect[block] = (generation,)
            self.c.writes += 1
        else:
            self.expect[block] = (*old, generation)

    def check(self, block: int) -> bool:
        """Read one block and compare it; False on an error or wrong bytes."""
        buf = mmap.mmap(-1, BLOCK)
        fd = self.fd
        n = self._io("read", block, lambda: os.preadv(fd, [buf], block * BLOCK))
        if n is None:
            return False
        self.c.reads += 1
        self.seen.add(block)
        if self.faulted.is_set():
            self.c.faulted_reads += 1
        self.last_read = time.monotonic()
        data = bytes(buf[:n])
        allowed = self.expect.get(block, (0,))
        for generation in allowed:
            if data == content(self.name, block, generation, self.image):
                self.expect[block] = (generation,)
                return True
        wrong = min(differing(data, content(self.name, block, g, self.image)) for g in allowed)
        self.c.wrong_bytes += wrong
        self.note(f"WRONG BYTES: block {block}: {wrong} bytes match no generation of {allowed}")
        return False

    def watch(self, timeout_s: float) -> None:
        """Count an I/O in flight for longer than ``timeout_s`` as one error."""
        started = self.op_started
        if started is not None and not self.hang_counted and time.monotonic() - started > timeout_s:
            self.hang_counted = True
            self.c.hangs += 1
            self.error(f"an I/O hangs for more than {timeout_s:g} s")

    def stop_load(self, timeout_s: float) -> bool:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout_s)
            return not self.thread.is_alive()
        return True

    def verify_all(self, timeout_s: float) -> None:
        if not self.io_lock.acquire(timeout=timeout_s):
            self.error("an I/O hangs: the disk cannot be verified")
            return
        try:
            for block in range(self.blocks):
                self.check(block)
        finally:
            self.io_lock.release()


# -- the run -----------------------------------------------------------------------------------
class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir: Path = args.workdir
        self.cluster = LocalCluster(
            self.workdir / "cluster",
            args.nodes,
            name=args.lab,
            subnet=args.subnet,
            heartbeat_interval=1,
            node_timeout=args.node_timeout,
            tgt_control_base=args.tgt_base,
            lab_state_dir=self.workdir / "lab",
        )
        self.image_file = self.workdir / "image.raw"
        self.image = b""
        self.disks: list[Disk] = []
        self.faulted = threading.Event()  # from a fault until the cluster is healthy again
        self.rounds = 0
        self.kills = 0
        self.unhealthy: list[str] = []
        self.problems: list[str] = []

    # setup
    def start(self) -> None:
        self.image = os.urandom(self.args.image_mib << 20)
        self.image_file.write_bytes(self.image)
        t0 = time.monotonic()
        self.cluster.start()
        self.export_image()
        vms = self.workdir / "vms"
        vms.mkdir()
        for node in self.cluster.node_names:
            for i in range(self.args.vms_per_node):
                name = f"vm-{node}-{i}"
                result = self.cluster.rpc(node, "create", name, IMAGE, self.connection())
                if not result.startswith("0:"):
                    raise RuntimeError(f"create {name} on {node}: {result}")
                disk = Disk(
                    name,
                    node,
                    Path(result[2:]),
                    vms / f"{name}.raw",
                    self.image,
                    random.Random(f"{self.args.seed}:{name}"),
                    self.args.write_share,
                    self.args.pace_ms / 1000,
                    faulted=self.faulted,
                )
                self.disks.append(disk)  # before open: close() stops what open started
                disk.open()
        print(
            f"cluster up in {time.monotonic() - t0:.1f} s: {self.args.nodes} nodes, "
            f"{len(self.disks)} disks of {self.args.image_mib} MiB (lab {self.args.lab})",
            flush=True,
        )
        self.wait_healthy("start")
        for disk in self.disks:
            disk.start_load()

    def export_image(self) -> None:
        result = self.cluster.rpc("img", "create_image_target", IMAGE, str(self.image_file))
        if not result.startswith("0:"):
            raise RuntimeError(f"create_image_target: {result}")

    def connection(self) -> dict[str, Any]:
        return self.cluster.connection(IMAGE)

    # health
    def health(self, since: float) -> str | None:
        """None when healthy, else what is not (see the module docstring)."""
        c = self.cluster
        peers = {f"{c.hosts[n].address}:{IMAGE}": n for n in c.node_names}
        for node in c.node_names:
            want = sorted(f"{d.name}:{IMAGE}" for d in self.disks if d.node == node)
            try:
                got = c.rpc(node, "list", timeout_s=15)
            except Exception as exc:
                return f"{node}: list() failed: {str(exc).splitlines()[0][:120]}"
            if got != want:
                return f"{node}: list() = {got}"
        for host in ("img", *c.node_names):
            for component in ("qsd", "tgtd"):
                if c.component_pid(host, component) is None:
                    return f"{host} runs no {component}"
        try:
            exported = c.rpc("img", "list_image_target", timeout_s=15)
        except Exception as exc:
            return f"img: list_image_target() failed: {str(exc).splitlines()[0][:120]}"
        if IMAGE not in exported:
            return f"the image server exports {sorted(exported)}"
        try:
            tree = c.volt_tree(IMAGE)
        except Exception as exc:
            return f"Volt does not answer: {str(exc).splitlines()[0][:120]}"
        members = {n["peer_id"]: n for n in tree}
        if set(members) != set(peers):
            return f"Volt's tree holds {sorted(members)}"
        for entry in tree:
            if entry["depth"] > 1 and not entry["parents"]:
                return f"{entry['peer_id']} has no parents at depth {entry['depth']}"
            if set(entry["parents"]) - set(members):
                return f"{entry['peer_id']} has parents outside the tree: {entry['parents']}"
        reads_from: dict[str, list[str]] = {}
        for peer, node in peers.items():
            paths = c.paths(node, IMAGE)
            if not paths:
                return f"{node} has no paths"
            named = reads_from[peer] = [p["peer_id"] for p in paths if p.get("peer_id")]
            if set(named) - set(members) or peer in named:
                return f"{node} reads from {named}"
            if named and named != members[peer]["parents"][: len(named)]:
                return f"{node} reads from {named}, Volt says {members[peer]['parents']}"
        if cycle := _cycle(reads_from):
            return f"the nodes read from each other in a cycle: {cycle}"
        for disk in self.disks:
            # (a disk on a crashed stack reads again only once restarted: checked then)
            if disk.last_read < since and disk.thread is not None and not disk.outage:
                return f"{disk.name} has completed no read since the restore"
        return None

    def wait_healthy(self, what: str) -> float:
        t0 = time.monotonic()
        reason = None
        while time.monotonic() - t0 < self.args.health_timeout_s:
            self.watch()
            reason = self.health(t0)
            if reason is None:
                return time.monotonic() - t0
            self.sleep(1.0)
        self.unhealthy.append(f"{what}: {reason}")
        print(f"NOT HEALTHY after {self.args.health_timeout_s} s ({what}): {reason}", flush=True)
        return time.monotonic() - t0

    def watch(self) -> None:
        for disk in self.disks:
            disk.watch(self.args.io_timeout_s)

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
            self.watch()

    # rounds
    def pick(self) -> tuple[str, str]:
        fault = self.rng.choice(FAULTS)
        nodes = self.cluster.node_names
        if fault == "volt-api":
            return fault, "volt"
        if fault == "qsd":
            return fault, self.rng.choice(nodes)
        return fault, self.rng.choice(["img", *nodes])

    def round(self, number: int) -> None:
        fault, host = self.pick()
        hold = self.rng.uniform(*self.args.hold_s)
        t0 = time.monotonic()
        local = [d for d in self.disks if d.node == host]
        children = self.children_of(host)
        if fault in OUTAGE_FAULTS:
            for disk in local:
                disk.outage = True
        self.faulted.set()
        if fault == "link":
            self.cluster.set_link(host, False)
            what = f"cut {host}'s link"
        else:
            pid = self.cluster.kill_component(host, fault)
            self.kills += 1
            what = f"SIGKILL {fault} pid {pid} on {host}"
        if children:
            what += f" (parent of {', '.join(children)})"
        self.sleep(hold)
        self.restore(fault, host)
        took = self.wait_healthy(f"round {number}: {what}")
        if fault == "qsd":
            for disk in local:
                disk.reopen(self.args.io_timeout_s)
            took += self.wait_healthy(f"round {number}: {host}'s VMs restarted")
        self.faulted.clear()
        self.rounds += 1
        outage = sum(d.c.outage_errors for d in local)
        print(
            f"round {number}: {what}, held {hold:.1f} s, healthy {took:.1f} s after the "
            f"restore ({time.monotonic() - t0:.1f} s; E {self.errors()}, L {self.wrong()}"
            + (f", {host}'s outage errors so far {outage}" if fault in OUTAGE_FAULTS else "")
            + ")",
            flush=True,
        )

    def children_of(self, host: str) -> list[str]:
        """The nodes that read from ``host`` now (its children; for the image server: the
        nodes with a path to it)."""
        c = self.cluster
        if host == "img":
            return [n for n in c.node_names if any(not p.get("peer_id") for p in c.paths(n, IMAGE))]
        if host not in c.node_names:
            return []
        peer = f"{c.hosts[host].address}:{IMAGE}"
        return [n for n in c.node_names if peer in [p.get("peer_id") for p in c.paths(n, IMAGE)]]

    def restore(self, fault: str, host: str) -> None:
        c = self.cluster
        if fault == "link":
            c.set_link(host, True)
        elif fault == "volt-api":
            c.start_volt()
        elif fault == "virtmanserver":
            c.start_virtman(host)
        # qsd, tgtd: the node's virtmanserver starts them again by itself

    def errors(self) -> int:
        return sum(d.c.errors for d in self.disks)

    def wrong(self) -> int:
        return sum(d.c.wrong_bytes for d in self.disks)

    # end
    def finish(self) -> None:
        timeout = self.args.io_timeout_s
        for disk in self.disks:
            if not disk.stop_load(timeout):
                disk.error("the worker did not stop")
        # Every disk read whole, in parallel; one whose read hangs is counted and left.
        checks = [
            (disk, threading.Thread(target=disk.verify_all, args=(timeout,), daemon=True))
            for disk in self.disks
        ]
        for _, thread in checks:
            thread.start()
        while any(t.is_alive() and not d.hang_counted for d, t in checks):
            self.sleep(0.5)
        reads = sum(d.c.reads for d in self.disks)
        writes = sum(d.c.writes for d in self.disks)
        outage = sum(d.c.outage_errors for d in self.disks)
        hangs = sum(d.c.hangs for d in self.disks)
        first = sum(d.c.first_reads for d in self.disks)
        faulted = sum(d.c.faulted_reads for d in self.disks)
        print(
            f"I/O: {reads} block reads ({first} first reads of a block, {faulted} during a "
            f"fault), {writes} block writes, of {BLOCK >> 10} KiB; {hangs} hangs, {outage} "
            "outage errors on nodes whose own qemu-storage-daemon was killed",
            flush=True,
        )

    def close(self) -> None:
        """Close the disks and the cluster, then look for anything left behind."""
        for disk in self.disks:
            try:
                disk.close()
            except Exception as exc:
                self.problems.append(f"{disk.name}: could not close: {exc}")
        c = self.cluster
        try:
            c.destroy_all()
        except Exception as exc:
            self.problems.append(f"destroy: {exc}")
        stops = []
        for name in [*c.node_names, "img", "volt"]:
            daemon = c.daemons.pop(name, None)
            if daemon is None:
                continue
            t0 = time.monotonic()
            status = daemon.stop(timeout=STOP_TIMEOUT_S)
            stops.append(f"{name} {time.monotonic() - t0:.1f} s")
            if status != 0:
                self.problems.append(f"{name}'s daemon exited {status}{_log_ends(daemon)}")
        print(f"daemons stopped: {', '.join(stops)}", flush=True)
        for host in c.hosts:
            left = c.processes(host)
            if left:
                argvs = [_cmdline(pid) for pid in left]
                self.problems.append(f"processes left in {host}'s namespace: {argvs}")
        c.lab.close()
        prefix = f"{self.args.lab}-"
        if [ns for ns in list_netns() if ns.startswith(prefix)]:
            self.problems.append(f"namespaces left: {list_netns()}")
        mine = str(self.workdir)
        ports = {str(self.args.tgt_base + i) for i in range(self.args.nodes + 1)}
        for pid in set(_all_pids()) - _ancestors():
            argv = _cmdline(pid)
            if argv and (mine in " ".join(argv) or _is_our_tgtd(argv, ports)):
                self.problems.append(f"process left: {pid} {argv}")
        if mounts_under(self.workdir):
            self.problems.append(f"mounts left: {mounts_under(self.workdir)}")
        for node in ["img", *c.node_names]:
            d = c.node_dir(node)
            for sub in ("run/exports", "run/paths", "state/instances", "state/cache"):
                if (d / sub).exists() and any((d / sub).iterdir()):
                    self.problems.append(f"files left in {d / sub}: {os.listdir(d / sub)}")
            journal = d / "state" / "journal.json"
            if journal.exists():
                records = json.loads(journal.read_text())
                if any(records.get(kind) for kind in ("images", "instances")):
                    self.problems.append(f"{journal} still records {records}")
            stale = [p.name for p in (d / "run").glob("*") if p.suffix in (".pid", ".qmp")]
            if stale:
                self.problems.append(f"files left in {d / 'run'}: {stale}")
        left = [p.name for p in (self.workdir / "vms").glob("*")]
        if left:
            self.problems.append(f"files left in {self.workdir / 'vms'}: {left}")


def _log_ends(daemon: Daemon) -> str:
    """The last lines of a daemon's log file and of its output (stacks, on SIGUSR1)."""
    parts = []
    for path in (daemon.extra.get("dir", daemon.log.parent) / "virtman.log", daemon.log):
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-60:]
            parts.append(f"\n  the end of {path}:\n    " + "\n    ".join(lines))
    return "".join(parts)


def _cycle(graph: dict[str, list[str]]) -> list[str]:
    """A cycle of ``graph`` (node -> the nodes it reads from), or []."""
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> list[str]:
        if node in trail:
            return trail[trail.index(node) :]
        if node in done:
            return []
        for parent in graph.get(node, []):
            if found := visit(parent, [*trail, node]):
                return found
        done.add(node)
        return []

    for node in graph:
        if found := visit(node, []):
            return found
    return []


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _ancestors() -> set[int]:
    """This process and its parents (their command lines name the work directory)."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_our_tgtd(argv: list[str], ports: set[str]) -> bool:
    if Path(argv[0]).name != "tgtd":
        return False
    return any(argv[i] == "-C" and argv[i + 1] in ports for i in range(len(argv) - 1))


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=20, help="faults, one per round")
    p.add_argument("--nodes", type=int, default=4, help="compute nodes (at least 4)")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    p.add_argument("--vms-per-node", type=int, default=1, help="instances per node")
    p.add_argument("--image-mib", type=int, default=256, help="image size, MiB")
    p.add_argument("--write-share", type=float, default=0.25, help="share of writes")
    p.add_argument("--pace-ms", type=float, default=20, help="pause after each I/O per disk")
    p.add_argument(
        "--hold-s", type=float, nargs=2, default=(3.0, 8.0), help="fault duration (uniform)"
    )
    p.add_argument("--settle-s", type=float, default=2.0, help="pause between rounds")
    p.add_argument("--io-timeout-s", type=float, default=60, help="an I/O longer: an error")
    p.add_argument("--health-timeout-s", type=float, default=180, help="per round")
    p.add_argument("--node-timeout", type=int, default=6, help="Volt's node_timeout, s")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmt-chaos"))
    p.add_argument("--lab", default="vmtch", help="namespace prefix")
    p.add_argument("--subnet", default="10.234.0.0/24")
    p.add_argument("--tgt-base", type=int, default=4200, help="first tgtd control port")
    args = p.parse_args(argv)
    if args.nodes < 4:
        p.error("--nodes must be at least 4")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def clean_workdir(workdir: Path, lab: str) -> None:
    """Remove what a previous (killed) run left: its lab, FUSE mounts, files."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise SystemExit(f"chaos: {workdir} is not empty and not a chaos work dir")
    if Lab.cleanup(lab, workdir / "lab"):
        print(f"removed the namespaces a previous run left ({workdir / 'lab'})")
    for point in reversed(mounts_under(workdir) if workdir.exists() else []):
        subprocess.run(["fusermount3", "-u", "-z", point], check=False)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by bench/chaos.py: emptied by its next run\n")


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    clean_workdir(args.workdir, args.lab)
    chaos = Chaos(args)
    print(f"chaos: {args.rounds} rounds, {args.nodes} nodes, seed {args.seed}", flush=True)
    try:
        chaos.start()
        for number in range(1, args.rounds + 1):
            chaos.round(number)
            chaos.sleep(args.settle_s)
        chaos.finish()
    except BaseException:
        print(f"chaos: aborted; work directory kept: {args.workdir}", file=sys.stderr)
        raise
    finally:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            chaos.close()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    problems = chaos.problems + [f"unhealthy: {u}" for u in chaos.unhealthy]
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    errors, wrong = chaos.errors(), chaos.wrong()
    if problems or errors or wrong:
        print(f"work directory kept: {args.workdir}")
        for disk in chaos.disks:
            (args.workdir / f"{disk.name}.events").write_text("\n".join(disk.log) + "\n")
    else:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(
        f"chaos: {chaos.rounds} rounds, {chaos.kills} kills, {errors} reader I/O errors, "
        f"{wrong} lost or wrong bytes, {time.monotonic() - started:.0f} s"
    )
    return 0 if not problems and errors == 0 and wrong == 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("chaos: needs root (namespaces, tgtd, FUSE)")
    lock_path = args.workdir.with_name(args.workdir.name + ".lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"chaos: another run holds {lock_path}") from None
        signal.signal(signal.SIGTERM, _sigterm)
        try:
            return run(args)
        finally:
            lock_path.unlink(missing_ok=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("chaos: interrupted (cluster torn down)", file=sys.stderr)
        sys.exit(130)
