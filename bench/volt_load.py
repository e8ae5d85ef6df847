#!/usr/bin/env python3
"""Load benchmark of volt-api: thousands of simulated compute nodes against one real daemon.

The script starts ONE volt-api on 127.0.0.1 (free port, temporary directory, SQLite or the
``--database`` given, e.g. an empty PostgreSQL database, token auth, its own pid file), then
simulates ``--nodes`` compute nodes, each from its own source
address in 127.0.0.0/8 (127.1.x.y, ...). A node opens one HTTP/1.1 keep-alive connection and
sends, on it:

1. ``GET /v1/volumes/query/{volume}`` (retried while a btree executor answers "not placeable"),
2. ``POST /v1/volumes/{volume}/{peer_id}`` (its relay target is ready),
3. ``--heartbeats`` times ``PUT /v1/members/heartbeat``,

(``--place-on-register``: no query; the registration carries ``"place": true`` and places the
node, as virtman does since issue 15: one request per node of a burst),

(``--warm-connections``: before the burst every node opens its connection and sends one
heartbeat, as a running virtman does every ``heartbeat_interval`` on the keep-alive connection
of its session, which volt-api keeps open between heartbeats; the burst then goes over those
open connections, and the figures, volt-api's CPU included, count the burst only),

then closes the connection. ``--concurrency`` nodes are in flight at any time. Every request's
latency is measured (write of the request to the last byte of the answer); any answer other
than 200 is an error. At the end ``GET /v1/volumes`` and ``GET /v1/members`` must account for
every node; then volt-api is stopped with SIGTERM (by its PID) and waited for.

The last line printed is always::

    volt_load: <R> req/s p50 <A> ms p99 <B> ms nodes <N>

The exit status is non-zero if any request failed or the final check did not match.

Traffic never leaves 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volt.connlimit import raise_open_files

TOKEN = "volt-load-token"  # a throw-away secret of a private test daemon
SERVER_HOST = "127.0.0.1"
KINDS = ("query", "register", "heartbeat")
MAX_NODES = 254 * 254 * 120  # distinct source addresses 127.1.1.1 ... 127.120.254.254
QUERY_RETRY_DELAY = 0.02  # seconds between queries answered "not placeable" (btree executors)
QUERY_MAX_ATTEMPTS = 1000
HEARTBEAT_PATH = "/v1/members/heartbeat"
CLIENT_FILES = 64  # the client's files besides the nodes' sockets
PhaseHook = Callable[[str, "ShardResult"], None]  # ("warm" | "burst", that phase's result)
ERRORS_KEPT = 20  # error descriptions kept per client process (the count is always exact)
ERRORS_PRINTED = 5


# -- addresses and names --------------------------------------------------------------------
def source_address(i: int) -> str:
    """The source address of node ``i``: 127.1.1.1, 127.1.1.2, ... (never .0 or .255)."""
    return f"127.{1 + i // (254 * 254)}.{1 + (i // 254) % 254}.{1 + i % 254}"


def volume_of(i: int, images: int) -> str:
    return f"volume-load-{i % images}"


# -- the daemon -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((SERVER_HOST, 0))
        return int(s.getsockname()[1])


class VoltServer:
    """One volt-api with its own configuration, SQLite file (unless ``database``: that
    SQLAlchemy URL), pid file and log in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        executor: str,
        api_threads: int,
        database: str | None = None,
        group_commit: bool = True,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "volt.conf"
        self.pid_file = workdir / "volt-api.pid"
        self.log_path = workdir / "volt-api.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.config_path.write_text(
            "[DEFAULT]\n"
            f"bind_host = {SERVER_HOST}\n"
            f"bind_port = {self.port}\n"
            "node_timeout = 600\n"
            f"api_threads = {api_threads}\n"
            f"default_executor = {executor}\n"
            f"pid_file = {self.pid_file}\n"
            "auth_strategy = token\n"
            "[auth]\n"
            f"token = {TOKEN}\n"
            "[database]\n"
            f"connection = {database or 'sqlite:///' + str(workdir / 'volt.sqlite')}\n"
            f"group_commit = {str(group_commit).lower()}\n",
            encoding="utf-8",
        )

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "volt.cmd.api", "--config-file", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"volt-api exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.request("GET", "/v1/volumes")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"volt-api not ready within {timeout} s:\n{self.log_tail()}")
        pid = int(self.pid_file.read_text(encoding="ascii").strip())
        if pid != self.proc.pid:
            raise RuntimeError(f"pid file says {pid}, but volt-api is {self.proc.pid}")
        self.pid = pid

    def worker_pid(self) -> int | None:
        """The Granian worker (the child of volt-api that runs the WSGI application)."""
        if self.pid is None:
            return None
        children: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                children += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        if not children:
            return None
        # Prefer the multiprocessing worker over helpers such as a resource tracker.
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmdline:
                return child
        return children[0]

    def request(self, method: str, path: str) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(SERVER_HOST, self.port, timeout=60)
        try:
            conn.request(method, path, headers={"X-Auth-Token": TOKEN})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
        finally:
            conn.close()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the PID of volt-api, then wait (SIGKILL to that PID if it hangs)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"volt-api {self.proc.pid} ignored SIGTERM for {timeout} s; SIGKILL")
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- the client -----------------------------------------------------------------------------
class ProtocolError(Exception):
    pass


@dataclass
class ShardConfig:
    port: int
    nodes: list[int]
    images: int
    heartbeats: int
    concurrency: int
    timeout: float
    place_on_register: bool = False
    warm: bool = False  # connections opened (one heartbeat each) before the burst


@dataclass
class ShardResult:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    connects: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    not_placeable: int = 0
    nodes_done: int = 0
    started: float = 0.0
    finished: float = 0.0
    cpu: float = 0.0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERRORS_KEPT:
            self.error_samples.append(text)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 response: (status, body, server closes the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, header_block = head[:-4].partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {status_line[:80]!r}")
    status = int(parts[1])
    close = parts[0] == b"HTTP/1.0"
    length: int | None = None
    chunked = False
    for line in header_block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            raise ProtocolError(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or (length is not None and length != int(value)):
                raise ProtocolError(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            close = b"close" in tokens or (close and b"keep-alive" not in tokens)
    if chunked:
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return status, bytes(body), close
    if length is None:
        if 100 <= status < 200 or status in (204, 304):
            return status, b"", close
        return status, await reader.read(), True  # delimited by the end of the connection
    return status, await reader.readexactly(length), close


def build_request(method: str, path: str, port: int, body: bytes | None = None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {SERVER_HOST}:{port}",
        f"X-Auth-Token: {TOKEN}",
    ]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {len(body) if body is not None else 0}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class NodeConnection:
    """The keep-alive connection of one node, bound to the node's source address."""

    def __init__(self, cfg: ShardConfig, address: str, result: ShardResult) -> None:
        self.cfg = cfg
        self.address = address
        self.result = result
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self, kind: str, request: bytes) -> tuple[int, bytes]:
        async with asyncio.timeout(self.cfg.timeout):
            if self.writer is None:
                started = time.perf_counter()
                self.reader, self.writer = await asyncio.open_connection(
                    SERVER_HOST, self.cfg.port, local_addr=(self.address, 0)
                )
                self.result.connects.append(time.perf_counter() - started)
            assert self.reader is not None
            started = time.perf_counter()
            self.writer.write(request)
            await self.writer.drain()
            status, body, close = await read_response(self.reader)
            self.result.latencies[kind].append(time.perf_counter() - started)
        if close:  # the server ends keep-alive: the next request reconnects
            await self.close()
        return status, body

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def warm_node(i: int, cfg: ShardConfig, result: ShardResult) -> NodeConnection | None:
    """Open node ``i``'s connection with one heartbeat (a running virtman's, before it has
    any image) and keep it open; None (an error counted) if that failed."""
    conn = NodeConnection(cfg, source_address(i), result)
    try:
        status, body = await conn.call("heartbeat", build_request("PUT", HEARTBEAT_PATH, cfg.port))
        if status == 200 and conn.writer is not None:
            return conn
        result.error(f"warm-up heartbeat {conn.address}: HTTP {status} {body[:200]!r}")
    except (OSError, EOFError, ProtocolError, ValueError, TimeoutError) as exc:
        what = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        result.error(f"warm-up heartbeat {conn.address}: {what}")
    await conn.close()
    return None


async def run_node(
    i: int, cfg: ShardConfig, result: ShardResult, conn: NodeConnection | None = None
) -> None:
    """Node ``i``'s requests, over ``conn`` (a warm connection) or a new connection."""
    address = source_address(i)
    volume = volume_of(i, cfg.images)
    peer_id = f"{address}:{volume}"
    port = cfg.port
    keep = conn is not None  # a warm connection: the caller closes it after the burst
    if conn is None:
        conn = NodeConnection(cfg, address, result)
    conn.result = result
    kind = "connect"
    try:
        kind = "query"
        query = build_request("GET", f"/v1/volumes/query/{volume}", port)
        for _ in range(0 if cfg.place_on_register else QUERY_MAX_ATTEMPTS):
            status, body = await conn.call(kind, query)
            if status != 200:
                result.error(f"{kind} {peer_id}: HTTP {status} {body[:200]!r}")
                return
            answer = json.loads(body)
            if answer.get("peer_id") == peer_id:
                break
            if answer.get("peer_id") is not None:
                result.error(f"{kind} {peer_id}: answer names another peer: {body[:200]!r}")
                return
            result.not_placeable += 1
            await asyncio.sleep(QUERY_RETRY_DELAY)
        else:
            if not cfg.place_on_register:
                result.error(f"{kind} {peer_id}: not placed after {QUERY_MAX_ATTEMPTS} queries")
                return

        kind = "register"
        relay: dict[str, object] = {
            "host": address,
            "port": "3260",
            "iqn": f"iqn.2010-10.org.openstack:{volume}",
            "lun": "1",
        }
        if cfg.place_on_register:
            relay["place"] = True
        register = build_request(
            "POST", f"/v1/volumes/{volume}/{peer_id}", port, json.dumps(relay).encode()
        )
        status, body = await conn.call(kind, register)
        if status != 200:
            result.error(f"{kind} {peer_id}: HTTP {status} {body[:200]!r}")
            return

        kind = "heartbeat"
        heartbeat = build_request("PUT", HEARTBEAT_PATH, port)
        expected = f'"peer_id": "{peer_id}"'.encode()
        for _ in range(cfg.heartbeats):
            status, body = await conn.call(kind, heartbeat)
            if status != 200:
                result.error(f"{kind} {peer_id}: HTTP {status} {body[:200]!r}")
                return
            if expected not in body:
                result.error(f"{kind} {peer_id}: own node missing from {body[:200]!r}")
                return
        result.nodes_done += 1
    except (OSError, EOFError, ProtocolError, ValueError, TimeoutError) as exc:
        what = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        result.error(f"{kind} {peer_id}: {what}")
    finally:
        if not keep:
            await conn.close()


async def run_shard_async(cfg: ShardConfig, on_phase: PhaseHook | None = None) -> ShardResult:
    """Run the shard's nodes, ``cfg.concurrency`` at a time. ``cfg.warm``: first open every
    node's connection (one heartbeat each, the same concurrency) and call ``on_phase("warm",
    ...)``, then run the burst over the open connections, call ``on_phase("burst", ...)``
    and only then close them (a virtman node keeps its connection: closing is no part of
    the burst)."""
    result = ShardResult()
    workers = max(1, min(cfg.concurrency, len(cfg.nodes)))
    conns: dict[int, NodeConnection] = {}
    if cfg.warm:
        warm = ShardResult()
        to_open = iter(cfg.nodes)

        async def opener() -> None:
            for i in to_open:
                conn = await warm_node(i, cfg, warm)
                if conn is not None:
                    conns[i] = conn

        warm.started = time.monotonic()
        await asyncio.gather(*(opener() for _ in range(workers)))
        warm.finished = time.monotonic()
        result.errors += warm.errors
        result.error_samples += warm.error_samples
        if on_phase is not None:
            on_phase("warm", warm)
    pending = iter(i for i in cfg.nodes if not cfg.warm or i in conns)

    async def worker() -> None:
        for i in pending:  # one shared iterator: each node is taken by exactly one worker
            await run_node(i, cfg, result, conns.get(i))

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    result.started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    result.finished = time.monotonic()
    if on_phase is not None:
        on_phase("burst", result)
    for conn in conns.values():
        await conn.close()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )
    return result


def run_shard(cfg: ShardConfig, on_phase: PhaseHook | None = None) -> ShardResult:
    return asyncio.run(run_shard_async(cfg, on_phase))


def _shard_process(cfg: ShardConfig, barrier: Any, queue: Any) -> None:
    """Body of a client process: wait for the others, run the shard, send the result."""
    barrier.wait()
    queue.put(run_shard(cfg))


def run_load(cfgs: list[ShardConfig], on_phase: PhaseHook | None = None) -> list[ShardResult]:
    """Run the shards: in this process if there is one, else one client process each
    (``on_phase`` needs the one shard in this process)."""
    if len(cfgs) == 1:
        return [run_shard(cfgs[0], on_phase)]
    if on_phase is not None:
        raise ValueError("phase hooks need one client process")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(cfgs))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_shard_process, args=(cfg, barrier, queue)) for cfg in cfgs]
    for proc in procs:
        proc.start()
    results = []
    try:
        for _ in procs:
            results.append(queue.get())  # before join: a full pipe would block the child
    finally:
        for proc in procs:
            proc.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"client process(es) failed with exit codes {bad}")
    return results


# -- profiling ------------------------------------------------------------------------------
def start_profiler(path: Path, pid: int, gil: bool) -> subprocess.Popen[bytes]:
    """py-spy record of the worker for the load phase (stopped with SIGINT by its PID)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    cmd = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", fmt]
    cmd += ["--output", str(path), "--nonblocking", "--function"]
    if gil:
        cmd.append("--gil")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # let it attach before the load starts
    if proc.poll() is not None:
        assert proc.stderr is not None
        raise RuntimeError(f"py-spy failed: {proc.stderr.read().decode(errors='replace')}")
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def summarize_collapsed(path: Path, top: int = 15) -> None:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        print(f"profile {path}: no samples")
        return
    print(f"profile {path}: {total} samples of the worker's Python threads")
    for title, table in (("self", own), ("inclusive", inclusive)):
        print(f"  top {top} by {title} time:")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {100 * count / total:5.1f}%  {frame[:110]}")


# -- report ---------------------------------------------------------------------------------
def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list (0 for an empty one)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def table_row(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
    top = ordered[-1] if ordered else 0.0
    return f"{name:<10} {len(ordered):>8} {p50 * 1e3:>9.2f} {p99 * 1e3:>9.2f} {top * 1e3:>9.2f}"


def check_state(server: VoltServer, nodes: int, images: int) -> list[str]:
    """Problems found by the cheap end-of-run check (empty: all nodes accounted for)."""
    problems = []
    status, volumes = server.request("GET", "/v1/volumes")
    if status != 200:
        return [f"GET /v1/volumes: HTTP {status}"]
    total = sum(v["count"] for v in volumes)
    print(
        f"check: {len(volumes)} volume(s), {total} node(s): "
        + ", ".join(f"{v['id']}={v['count']}" for v in volumes[:8])
    )
    if total != nodes:
        problems.append(f"GET /v1/volumes counts {total} nodes, expected {nodes}")
    if len(volumes) != min(images, nodes):
        problems.append(f"GET /v1/volumes lists {len(volumes)} volumes, expected {images}")
    status, members = server.request("GET", "/v1/members")
    if status != 200:
        problems.append(f"GET /v1/members: HTTP {status}")
    elif len(members) != nodes:
        problems.append(f"GET /v1/members lists {len(members)} hosts, expected {nodes}")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="volt_load.py",
        description=(
            "Start one volt-api on 127.0.0.1 (temporary directory, SQLite, token auth) and "
            "load it with simulated compute nodes, each from its own source address in "
            "127.0.0.0/8 over one keep-alive HTTP/1.1 connection: a query, a register, then "
            "HEARTBEATS heartbeats. Prints per-request-kind latencies, then a last line "
            "'volt_load: <R> req/s p50 <A> ms p99 <B> ms nodes <N>'. Exits non-zero if any "
            "request failed or the final state does not count every node."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=10000, help="simulated compute nodes")
    parser.add_argument(
        "--images", type=int, default=4, help="images (volumes) the nodes are spread across"
    )
    parser.add_argument(
        "--heartbeats", type=int, default=3, help="heartbeats each node sends after registering"
    )
    parser.add_argument(
        "--place-on-register",
        action="store_true",
        help="no query: each registration places its node (virtman since issue 15)",
    )
    parser.add_argument(
        "--warm-connections",
        action="store_true",
        help="before the burst, every node opens its connection with one heartbeat (a running "
        "virtman's keep-alive session); the burst and its figures use those connections",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="nodes in flight at once (in total over all client processes); each has one "
        "connection and one request outstanding. Latency grows with it once volt-api is "
        "saturated (requests queue); throughput does not",
    )
    parser.add_argument(
        "--executor",
        default="balanced",
        help="default_executor written in volt-api's config (balanced, btree, btreewithuncle)",
    )
    parser.add_argument(
        "--api-threads", type=int, default=4, help="api_threads written in volt-api's config"
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="client processes (asyncio each); the nodes and the concurrency are split "
        "between them, latencies merged. Use more than 1 if one client process saturates "
        "its core before the server does (see the CPU line of the report)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before a request counts as failed"
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="SQLAlchemy URL of volt-api's store instead of a fresh SQLite file, e.g. "
        "postgresql+psycopg://volt@127.0.0.1:5432/voltload. It must hold no tree (the end "
        "check counts every node)",
    )
    parser.add_argument(
        "--no-group-commit",
        action="store_true",
        help="write group_commit = false in volt-api's config: one store transaction per "
        "change (the behaviour before group commit; SQLite and MySQL stores)",
    )
    parser.add_argument(
        "--keep-dir",
        action="store_true",
        help="keep the temporary directory (config, SQLite file, volt-api log) and print it",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="record the volt-api worker with py-spy during the load phase (needs py-spy on "
        "PATH or beside this Python); FILE.svg: flame graph, FILE.json: speedscope, "
        "anything else: collapsed stacks, summarised on stdout",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL",
    )
    args = parser.parse_args(argv)
    for name in ("nodes", "images", "concurrency", "api_threads", "client_procs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.heartbeats < 0:
        parser.error("--heartbeats must be at least 0")
    if args.nodes > MAX_NODES:
        parser.error(f"--nodes must be at most {MAX_NODES}")
    if args.client_procs > args.concurrency:
        parser.error("--client-procs must not exceed --concurrency")
    if args.warm_connections and args.client_procs != 1:
        parser.error("--warm-connections needs --client-procs 1")
    return args


def split(total: int, parts: int, k: int) -> int:
    return total // parts + (1 if k < total % parts else 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warm_connections:  # every node's socket is held at once, here and in volt-api
        wanted = args.nodes + CLIENT_FILES
        soft, _ = raise_open_files(wanted)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            print(f"volt_load: --warm-connections holds {args.nodes} sockets at once; raise the "
                  "open-file hard limit (ulimit -Hn)")  # fmt: skip
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="volt-load-"))
    server = VoltServer(
        workdir,
        executor=args.executor,
        api_threads=args.api_threads,
        database=args.database,
        group_commit=not args.no_group_commit,
    )
    failed = False
    try:
        try:
            server.start()
        except (RuntimeError, OSError) as exc:
            print(f"volt_load: cannot start volt-api: {exc}")
            return 2
        worker = server.worker_pid()
        if args.keep_dir:
            print(f"directory {workdir} (kept)")
        print(
            f"volt-api pid {server.pid} (worker {worker}) on {SERVER_HOST}:{server.port}, "
            f"executor {args.executor}, api_threads {args.api_threads}, {os.cpu_count()} CPU(s), "
            f"store {(args.database or 'sqlite').split(':')[0]}, "
            f"group commit {'off' if args.no_group_commit else 'on'}"
        )
        print(
            f"load: {args.nodes} nodes x ("
            f"{'placing register' if args.place_on_register else 'query + register'} + "
            f"{args.heartbeats} heartbeats) "
            f"{'over warm connections ' if args.warm_connections else ''}"
            f"over {args.images} image(s), concurrency {args.concurrency}, "
            f"client process(es) {args.client_procs}"
        )
        procs = args.client_procs
        cfgs = [
            ShardConfig(
                port=server.port,
                nodes=list(range(k, args.nodes, procs)),
                images=args.images,
                heartbeats=args.heartbeats,
                concurrency=split(args.concurrency, procs, k),
                timeout=args.timeout,
                place_on_register=args.place_on_register,
                warm=args.warm_connections,
            )
            for k in range(procs)
        ]
        profiler = start_profiler(args.profile, worker, args.profile_gil) if args.profile else None
        marks = {"start": cpu_seconds(worker) + cpu_seconds(server.pid)}

        def on_phase(phase: str, part: ShardResult) -> None:
            marks[phase] = cpu_seconds(worker) + cpu_seconds(server.pid)
            if phase == "warm":
                print(
                    f"warm-up: {len(part.connects)} connections opened, one heartbeat each, in "
                    f"{part.finished - part.started:.2f} s; volt-api CPU "
                    f"{marks['warm'] - marks['start']:.1f} s (not counted below)"
                )

        try:
            results = run_load(cfgs, on_phase if args.warm_connections else None)
        finally:
            if profiler is not None:
                stop_profiler(profiler)
        end = marks.get("burst", cpu_seconds(worker) + cpu_seconds(server.pid))
        server_cpu = end - marks.get("warm", marks["start"])

        wall = max(r.finished for r in results) - min(r.started for r in results)
        by_kind = {k: [x for r in results for x in r.latencies[k]] for k in KINDS}
        everything = [x for k in KINDS for x in by_kind[k]]
        errors = sum(r.errors for r in results)
        print(f"{'kind':<10} {'count':>8} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
        print(table_row("connect", [x for r in results for x in r.connects]))
        for k in KINDS:
            print(table_row(k, by_kind[k]))
        print(table_row("all", everything))
        client_cpu = sum(r.cpu for r in results)
        print(
            f"wall {wall:.2f} s; volt-api CPU {server_cpu:.1f} s ({100 * server_cpu / wall:.0f}% "
            f"of a core, {1e3 * server_cpu / max(1, len(everything)):.3f} ms/request), "
            f"client CPU {client_cpu:.1f} s ({100 * client_cpu / wall:.0f}%); "
            f"worker RSS {rss_mib(worker):.0f} MiB; not-placeable answers "
            f"{sum(r.not_placeable for r in results)}"
        )
        if errors:
            failed = True
            print(f"ERRORS: {errors} request(s) failed; the first ones:")
            samples = [s for r in results for s in r.error_samples]
            for sample in samples[:ERRORS_PRINTED]:
                print(f"  {sample}")
        problems = check_state(server, args.nodes, args.images)
        for problem in problems:
            failed = True
            print(f"CHECK FAILED: {problem}")
        if args.profile is not None and args.profile.suffix not in (".svg", ".json"):
            summarize_collapsed(args.profile)
        elif args.profile is not None:
            print(f"profile written to {args.profile}")
        ordered = sorted(everything)
        rate = len(everything) / wall if wall > 0 else 0.0
        stopped = server.stop()
        if stopped not in (0, -signal.SIGTERM):
            print(f"volt-api exited {stopped} after SIGTERM:\n{server.log_tail()}")
        print(
            f"volt_load: {rate:.0f} req/s p50 {percentile(ordered, 0.5) * 1e3:.2f} ms "
            f"p99 {percentile(ordered, 0.99) * 1e3:.2f} ms nodes {args.nodes}"
        )
    finally:
        server.stop()
        if not args.keep_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
