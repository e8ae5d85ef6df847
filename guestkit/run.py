"""Boot N test guests (QEMU, TCG) on private bridges inside a namespace the run creates.

``run_guests(guest, nodes, payload_dir)``:

1. removes what a killed earlier run left (``cleanup_stale``: its state file names them);
2. writes the payload tar (``guestkit.payload``: the caller's folder + the project's code);
3. creates network namespace ``gk-<run>`` holding bridges ``gkbr0`` (and ``gkbr1``) and one
   tap per node per bridge, and records each object in ``<cache_dir>/state/gk-<run>.json`` *before*
   creating it;
4. starts one ``qemu-system-x86_64 -accel tcg -smp 1`` per node inside the namespace
   (``nsenter --net``), disks: ``vda`` the image with ``snapshot=on`` (it stays pristine),
   ``vdb`` the payload (read-only), ``vdc`` a results disk; node ``NAME:MEM:IDX`` gets
   ``ci.role=NAME ci.idx=IDX`` and ``eth<B> = 10.77.<B>.IDX/24`` on bridge ``gkbr<B>``;
5. waits until every guest powered off, the wall-clock ``timeout_s`` passed, or a guest
   failed and the others had ``fail_grace_s`` more;
6. always tears down (QEMU by PID, taps, bridges, namespace, state file), also on an error
   or Ctrl-C, then reads each guest's ``GUESTKIT-RESULT rc=N`` console line and unpacks its
   results disk (the guest's ``/ci/out``) into ``<work_dir>/<NAME>/out``.

Network safety: the addresses exist only inside the guests. The namespace has no address
and no route, nothing is created in the root namespace, and nothing here ever connects to a
guest: all traffic stays on the run's bridges.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brick import proc as proc_info
from brick.daemon import start_time, terminate
from brick.exception import BrickError, Conflict, InvalidArgument, NotFound, Timeout
from brick.netns import (
    add_bridge,
    add_netns,
    add_tap,
    delete_link,
    delete_netns,
    kill_netns_processes,
    netns_inode,
    nsenter_argv,
    root_links,
)
from brick.wait import wait_until
from guestkit.build import Guest, default_cache_dir
from guestkit.payload import CHECKOUT, PROJECT_PACKAGES, write_payload

LOG = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# The guests' CPU model. Under TCG, "max" (AVX2 and the rest) is the slow choice: a guest's
# memcpy-heavy work runs several times slower (`dd` of /dev/zero: 8.0 s vs 1.1 s for 2 GB,
# sha256 of 24 MiB 3.6-4.4 s vs 2.5 s, a whole boot-and-run 51 s vs 37-39 s, QEMU 7.2,
# 2026-12-08); Debian's userspace and kernel need nothing beyond the x86-64 baseline.
CPU = "qemu64"
_CPU_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,+=-]{0,127}", re.ASCII)
NETNS_PREFIX = "gk-"
SUBNET = "10.77.{bridge}.0/24"
ADDRESS = "10.77.{bridge}.{index}/24"
MAX_BRIDGES = 2
RESULT = re.compile(r"GUESTKIT-RESULT rc=(\d+)")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,15}")
_STATE_VERSION = 1
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Node:
    """One guest: role ``name``, ``mem_mib`` of RAM, ``index`` (its addresses' last byte)."""

    name: str
    mem_mib: int
    index: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidArgument("node name", self.name, "must match [A-Za-z][A-Za-z0-9_-]{0,15}")
        if isinstance(self.mem_mib, bool) or not isinstance(self.mem_mib, int):
            raise InvalidArgument("node memory", self.mem_mib, "must be an integer (MiB)")
        if not 128 <= self.mem_mib <= 16384:
            raise InvalidArgument("node memory", self.mem_mib, "must be 128-16384 MiB")
        if isinstance(self.index, bool) or not isinstance(self.index, int):
            raise InvalidArgument("node index", self.index, "must be an integer")
        if not 1 <= self.index <= 254:
            raise InvalidArgument("node index", self.index, "must be 1-254")

    @classmethod
    def parse(cls, spec: str) -> Node:
        """``"NAME:MEM_MIB:IDX"``, e.g. ``"A:512:1"``."""
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise InvalidArgument("node", spec, "must be NAME:MEM_MIB:IDX, e.g. A:512:1")
        return cls(parts[0], int(parts[1]), int(parts[2]))

    def addresses(self, bridges: int) -> list[str]:
        """``10.77.<B>.<index>/24`` for each bridge B (inside the guest only)."""
        return [ADDRESS.format(bridge=b, index=self.index) for b in range(bridges)]


@dataclass
class NodeResult:
    """What came back from one guest."""

    node: Node
    rc: int | None  # from the console's GUESTKIT-RESULT line; None: run.sh never finished
    killed: bool  # still running when the run ended: stopped by the run
    timed_out: bool  # killed because the run's wall-clock timeout passed
    qemu_exit: int | None
    wall_s: float
    console: Path
    results: Path | None  # the guest's /ci/out, unpacked; None if the disk holds no tar
    qemu_pid: int

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.killed

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def result_text(self, name: str) -> str:
        """A file of the guest's ``/ci/out``; raises ``NotFound`` if it did not come back."""
        if self.results is None or not (self.results / name).is_file():
            raise NotFound(f"result file of node {self.node.name}", name)
        return (self.results / name).read_text()


@dataclass
class RunResult:
    """All guests of one run."""

    run_id: str
    netns: str
    work_dir: Path
    wall_s: float
    project_digest: str
    nodes: dict[str, NodeResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.nodes) and all(n.ok for n in self.nodes.values())

    def __getitem__(self, name: str) -> NodeResult:
        return self.nodes[name]

    def summary(self) -> str:
        lines = [f"run {self.run_id}: {'PASS' if self.ok else 'FAIL'} in {self.wall_s:.1f} s"]
        for r in self.nodes.values():
            verdict = "PASS" if r.ok else ("TIMEOUT" if r.timed_out else "FAIL")
            verdict += " (killed)" if r.killed and not r.timed_out else ""
            lines.append(
                f"  {r.node.name}: {verdict} rc={r.rc} after {r.wall_s:.1f} s, console {r.console}"
            )
        return "\n".join(lines)


# -- processes --------------------------------------------------------------------------------
def _is_ours(entry: Mapping[str, Any]) -> bool:
    """Whether the recorded QEMU still runs: same PID, start time and ``-name``."""
    pid = int(entry["pid"])
    return start_time(pid) == entry["start"] and entry["name"] in proc_info.cmdline(pid)


def _stop_qemu(entry: Mapping[str, Any], proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, then SIGKILL, one recorded QEMU, by PID (only if it is still ours);
    ``Timeout`` if it outlives SIGKILL."""
    child = proc

    def ended() -> bool:
        return child.poll() is not None if child is not None else not _is_ours(entry)

    terminate(
        int(entry["pid"]),
        lambda _pid: _is_ours(entry),
        what="QEMU",
        timeout_s=_STOP_TIMEOUT_S,
        kill_timeout_s=_STOP_TIMEOUT_S,
        ended=ended,
    )


# -- state file and teardown ----------------------------------------------------------------
def _state_path(state_dir: Path, run_id: str) -> Path:
    return state_dir / f"{NETNS_PREFIX}{run_id}.json"


def _save_state(path: Path, state: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _teardown(
    state: Mapping[str, Any], procs: Mapping[int, subprocess.Popen[bytes]] | None = None
) -> None:
    """Stop the recorded QEMUs, delete the links and the namespace (best effort, all of it)."""
    errors: list[Exception] = []
    for entry in state.get("qemu", []):
        try:
            _stop_qemu(entry, (procs or {}).get(int(entry["pid"])))
        except BrickError as exc:
            errors.append(exc)
    netns = str(state["netns"])
    links = [str(x) for x in state.get("links", [])]
    if netns and netns_inode(netns) is not None:
        try:
            kill_netns_processes(netns)
        except BrickError as exc:
            errors.append(exc)
        for link in reversed(links):  # taps first, then the bridges
            try:
                delete_link(netns, link)
            except BrickError as exc:
                errors.append(exc)
        try:
            delete_netns(netns)
        except BrickError as exc:
            errors.append(exc)
    stray = root_links() & set(links) if links else set()
    for link in sorted(stray):  # never created there; removed if it ever appears
        LOG.warning("guestkit: link %s found in the root namespace; deleting it", link)
        try:
            delete_link(None, link)
        except BrickError as exc:
            errors.append(exc)
    if errors:
        raise ExceptionGroup(f"guestkit run {state.get('run')}: teardown left objects", errors)


def cleanup_stale(cache_dir: Path | str | None = None) -> list[str]:
    """Tear down what runs whose process is gone left behind; returns their run ids.

    Reads ``<cache_dir>/state/gk-*.json``; a state file whose owner process still runs (same
    PID and start time) is left alone.
    """
    state_dir = Path(cache_dir or default_cache_dir()) / "state"
    cleaned = []
    for path in sorted(state_dir.glob(f"{NETNS_PREFIX}*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            LOG.warning("guestkit: unreadable state file %s left alone", path)
            continue
        owner = state.get("owner", {})
        if start_time(int(owner.get("pid", 0))) == owner.get("start"):
            continue  # a run in progress
        LOG.info("guestkit: cleaning up after killed run %s", state.get("run"))
        _teardown(state)
        path.unlink()
        cleaned.append(str(state.get("run")))
    return cleaned


# -- results --------------------------------------------------------------------------------
def _unpack_results(disk: Path, out: Path) -> Path | None:
    with open(disk, "rb") as f:
        if f.read(512).strip(b"\0") == b"":
            return None
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(disk, "r:") as tar:
            tar.extractall(out, filter="data")
    except (tarfile.TarError, OSError) as exc:
        LOG.warning("guestkit: results disk %s unreadable: %s", disk, exc)
        return None
    return out


def _console_rc(console: Path) -> int | None:
    text = console.read_text(errors="replace") if console.exists() else ""
    found = RESULT.findall(text)
    return int(found[-1]) if found else None


# -- the run --------------------------------------------------------------------------------
def _check_nodes(nodes: Sequence[Node], bridges: int) -> None:
    if not nodes:
        raise InvalidArgument("nodes", nodes, "must name at least one node")
    if not 1 <= bridges <= MAX_BRIDGES:
        raise InvalidArgument("bridges", bridges, f"must be 1-{MAX_BRIDGES}")
    for attr in ("name", "index"):
        values = [getattr(n, attr) for n in nodes]
        if len(set(values)) != len(values):
            raise InvalidArgument(f"node {attr}s", values, "must be unique")


def _qemu_argv(
    qemu: str,
    guest: Guest,
    node: Node,
    *,
    run_id: str,
    node_dir: Path,
    payload: Path,
    taps: Sequence[str],
    append: Sequence[str],
    coldplug: bool,
    tb_size_mib: int | None,
    cpu: str = CPU,
    allow_reboot: bool = False,
) -> list[str]:
    paths = [guest.kernel, guest.initrd, guest.rootfs, payload, node_dir]
    if any("," in str(p) for p in paths):
        raise InvalidArgument("path", [str(p) for p in paths], "must not contain a comma (QEMU)")
    cmdline = [
        "console=ttyS0",
        "panic=-1",
        "quiet",
        "loglevel=4",
        "net.ifnames=0",
        f"ci.node={node.name}",
        f"ci.role={node.name}",
        f"ci.idx={node.index}",
        f"ci.run={run_id}",
        f"ci.coldplug={int(coldplug)}",
        *(f"ci.ip{b}={addr}" for b, addr in enumerate(node.addresses(len(taps)))),
        *append,
    ]
    accel = "tcg" + (f",tb-size={tb_size_mib}" if tb_size_mib else "")
    argv = [qemu, "-name", f"gk-{run_id}-{node.name}", "-accel", accel, "-cpu", cpu]
    argv += ["-m", str(node.mem_mib), "-smp", "1", "-nodefaults", "-no-user-config"]
    argv += ["-display", "none", "-serial", f"file:{node_dir / 'console.log'}"]
    if not allow_reboot:  # a reboot then ends QEMU, like a power-off
        argv.append("-no-reboot")
    argv += ["-kernel", str(guest.kernel), "-initrd", str(guest.initrd)]
    argv += ["-append", " ".join(cmdline)]
    argv += ["-drive", f"file={guest.rootfs},format=raw,if=virtio,snapshot=on"]
    argv += ["-drive", f"file={payload},format=raw,if=virtio,readonly=on"]
    argv += ["-drive", f"file={node_dir / 'results.img'},format=raw,if=virtio"]
    argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom"]
    argv += ["-device", "virtio-rng-pci,rng=rng0"]
    for b, tap in enumerate(taps):
        argv += ["-netdev", f"tap,id=n{b},ifname={tap},script=no,downscript=no"]
        argv += ["-device", f"virtio-net-pci,netdev=n{b},mac=52:54:00:77:{b:02x}:{node.index:02x}"]
    return argv


def _prune_runs(runs_dir: Path, keep: int) -> None:
    if not runs_dir.is_dir():
        return
    old = sorted(
        (p for p in runs_dir.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{6}", p.name)),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )[keep:]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def run_guests(
    guest: Guest,
    nodes: Sequence[Node],
    payload_dir: Path | str | None,
    *,
    timeout_s: float = 300.0,
    bridges: int = 1,
    work_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    append: Sequence[str] = (),
    coldplug: bool = False,
    project_root: Path | None = CHECKOUT,
    packages: Sequence[str] = PROJECT_PACKAGES,
    extra_files: Mapping[str, bytes] | None = None,
    results_mib: int = 64,
    fail_grace_s: float = 20.0,
    tb_size_mib: int | None = None,
    cpu: str = CPU,
    qemu: str = QEMU,
    allow_reboot: bool = False,
) -> RunResult:
    """Boot ``nodes`` with the payload, wait, tear down, and return what came back.

    ``work_dir`` (default ``<cache_dir>/runs/<run>``, the last 5 kept) receives the payload
    and per node ``console.log``, ``qemu.log`` and ``out/``; run state lives in
    ``<cache_dir>/state``. Guest failures are reported in the result (``RunResult.ok``), never
    raised. Raises ``NotFound`` if QEMU or a tool is missing, ``InvalidArgument`` for bad
    nodes; setup or teardown errors propagate (an ``ExceptionGroup`` from teardown; the state
    file then stays and the next run's ``cleanup_stale`` retries). ``work_dir/<NAME>`` folders
    are replaced. ``allow_reboot`` lets a guest reboot in the same QEMU (its ``snapshot=on``
    disk keeps what the guest wrote); by default a reboot ends QEMU. ``cpu`` is QEMU's
    ``-cpu`` model, with its feature flags if any (``qemu64``, ``max,-avx2``).
    """
    _check_nodes(nodes, bridges)
    if not isinstance(cpu, str) or not _CPU_MODEL.fullmatch(cpu):
        raise InvalidArgument("cpu", cpu, "must be a QEMU CPU model [A-Za-z0-9_.,+=-]")
    qemu_bin = shutil.which(qemu)
    if qemu_bin is None:
        raise NotFound("QEMU binary", qemu)
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            raise NotFound("tool", tool)
    cache = Path(cache_dir or default_cache_dir()).absolute()
    state_dir = cache / "state"
    cleanup_stale(cache)
    run_id = secrets.token_hex(3)
    while netns_inode(f"{NETNS_PREFIX}{run_id}") is not None:  # never adopt a namespace
        run_id = secrets.token_hex(3)
    netns = f"{NETNS_PREFIX}{run_id}"
    if work_dir is None:
        _prune_runs(cache / "runs", keep=5)
        work_dir = cache / "runs" / run_id
    work_dir = Path(work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    payload = work_dir / "payload.tar"
    table = [(n.name, n.index, n.mem_mib, n.addresses(bridges)) for n in nodes]
    digest = write_payload(
        payload,
        Path(payload_dir) if payload_dir is not None else None,
        nodes=table,
        project_root=project_root,
        packages=packages,
        extra_files=extra_files,
    )
    owner = {"pid": os.getpid(), "start": start_time(os.getpid())}
    state: dict[str, Any] = {
        "version": _STATE_VERSION,
        "run": run_id,
        "netns": netns,
        "owner": owner,
        "work_dir": str(work_dir),
        "links": [],
        "qemu": [],
    }
    state_file = _state_path(state_dir, run_id)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    spawned: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    finished: dict[str, float] = {}
    deadline_hit = False
    try:
        _save_state(state_file, state)
        try:
            add_netns(netns, lo_up=True)
        except Conflict:  # someone else's, created meanwhile: not ours
            state["netns"] = ""
            raise
        bridge_names = [f"gkbr{b}" for b in range(bridges)]
        for br in bridge_names:
            state["links"].append(br)
            _save_state(state_file, state)
            add_bridge(netns, br)
        for node in nodes:
            node_dir = work_dir / node.name
            shutil.rmtree(node_dir, ignore_errors=True)
            node_dir.mkdir()
            with open(node_dir / "results.img", "wb") as f:
                f.truncate(results_mib << 20)
            taps = [f"gk{run_id}t{node.index}{b}" for b in range(bridges)]
            for tap, br in zip(taps, bridge_names, strict=True):
                state["links"].append(tap)
                _save_state(state_file, state)
                add_tap(netns, tap, br)
            argv = _qemu_argv(
                qemu_bin,
                guest,
                node,
                run_id=run_id,
                node_dir=node_dir,
                payload=payload,
                taps=taps,
                append=append,
                coldplug=coldplug,
                tb_size_mib=tb_size_mib,
                cpu=cpu,
                allow_reboot=allow_reboot,
            )
            env = {**os.environ, "TMPDIR": str(node_dir)}  # snapshot=on's overlay goes there
            with open(node_dir / "qemu.log", "wb") as log:
                proc = subprocess.Popen(
                    [*nsenter_argv(netns), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C reaches us, and we stop QEMU ourselves
                )
            procs[proc.pid] = proc
            spawned[node.name] = (proc, time.monotonic())
            state["qemu"].append(
                {
                    "pid": proc.pid,
                    "start": start_time(proc.pid),
                    "name": f"gk-{run_id}-{node.name}",
                }
            )
            _save_state(state_file, state)
            LOG.info("guestkit %s: node %s started (QEMU pid %d)", run_id, node.name, proc.pid)
        deadline_hit = _wait(spawned, finished, work_dir, started + timeout_s, fail_grace_s)
    finally:
        _teardown(state, procs)
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        LOG.info("guestkit %s: torn down", run_id)
    result = RunResult(run_id, netns, work_dir, time.monotonic() - started, digest)
    for node in nodes:
        node_dir = work_dir / node.name
        proc, t0 = spawned[node.name]
        result.nodes[node.name] = NodeResult(
            node=node,
            rc=_console_rc(node_dir / "console.log"),
            killed=node.name not in finished,
            timed_out=deadline_hit and node.name not in finished,
            qemu_exit=proc.returncode,
            wall_s=finished.get(node.name, time.monotonic()) - t0,
            console=node_dir / "console.log",
            results=_unpack_results(node_dir / "results.img", node_dir / "out"),
            qemu_pid=proc.pid,
        )
        (node_dir / "results.img").unlink()
    LOG.info("guestkit %s", result.summary())
    return result


def _wait(
    spawned: Mapping[str, tuple[subprocess.Popen[bytes], float]],
    finished: dict[str, float],
    work_dir: Path,
    deadline: float,
    fail_grace_s: float,
) -> bool:
    """Until all QEMUs exited, the deadline, or a failure plus ``fail_grace_s``; returns
    whether the deadline was reached."""
    first_failure: list[float] = []

    def done() -> bool:
        now = time.monotonic()
        for name, (proc, _) in spawned.items():
            if name not in finished and proc.poll() is not None:
                finished[name] = now
                rc = _console_rc(work_dir / name / "console.log")
                LOG.info("guestkit: node %s powered off (rc %s)", name, rc)
                if rc != 0 and not first_failure:
                    first_failure.append(now)
        if len(finished) == len(spawned):
            return True
        return bool(first_failure) and now - first_failure[0] >= fail_grace_s

    try:
        wait_until(
            done,
            timeout_s=max(deadline - time.monotonic(), 0.0),
            what="the guests to power off",
            max_interval_s=0.25,
        )
    except Timeout:
        LOG.warning("guestkit: timeout: %s still running", sorted(set(spawned) - set(finished)))
        return True
    for name in sorted(set(spawned) - set(finished)):
        LOG.warning("guestkit: node %s still running after another failed: stopping it", name)
    return False
