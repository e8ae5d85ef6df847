"""Prefetch: replay an image's recorded boot reads into a new stack's cache.

A trace records the order in which one boot of an image read its blocks: a JSON file
``{"version": 1, "image_size": <bytes>, "reads": [[offset, length], ...]}`` (bytes,
512-aligned, boot order; ``save_trace`` / ``load_trace``). A node that builds a new stack
for an image that has a trace (``<prefetch_dir>/<image>.trace.json``) reads the trace's
clusters, in first-touch order, from the image's origin (the FUSE file): the copy-on-read
layer fetches each one from the parents into the cache, so that the VM then finds it local.

The prefetch runs in one daemon thread per image (plus ``depth - 1`` helpers, so that at
most ``depth`` reads are in flight), never fails a create (every error is logged and ends
it), and stops between two reads once asked (teardown asks, then waits for it).

So that it pays when many nodes boot at once (issue 15), the prefetch as virtman starts it
(``PrefetchOptions``):

* never fetches a cluster twice: a ``ClusterMap`` (one byte per cluster) holds what it has
  read or has in flight, and what the cache already holds (``cached``: the cache's
  allocation map, e.g. ``qemu-img map`` of the qcow2 cache, asked again at most every
  ``CACHED_REFRESH_S``: a cluster the VM fetched meanwhile is skipped, not read again);
* is paced behind the VM's own reads (``Pacer``, delay-based after LEDBAT): a fetch that
  took ``slack`` times longer per byte than the fastest recent one means the link queues
  behind other reads (the VM's, other nodes'), so the prefetch pauses for as long as the
  queueing it saw and keeps one read in flight until fetches are fast again: it uses the
  idle link only;
* runs off the CPU the VM needs (its threads are ``SCHED_IDLE``, or nice 19 where that is
  refused) with bounded memory (one ``READ_CHUNK`` buffer per reader, reused).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from virtman import validation
from virtman.errors import VirtmanError
from virtman.layers.base import Device

if TYPE_CHECKING:
    from virtman.conf import Settings

LOG = logging.getLogger(__name__)

TRACE_VERSION = 1
SECTOR = 512
CLUSTER = 65536  # the qcow2 cache's cluster: the unit copy-on-read fetches upstream
MAX_READS = 1_000_000  # a boot reads tens of thousands of times; this is far beyond
MAX_READ_BYTES = 64 << 20  # one traced read
MAX_TRACE_FILE_BYTES = 64 << 20
READ_CHUNK = 1 << 20  # the largest single pread (longer extents are read in pieces)
MAX_DEPTH = 4
STOP_TIMEOUT_S = 10.0  # how long teardown waits for the reads in flight
CACHED_REFRESH_S = 1.0  # the cache's allocation map is asked at most this often

Extent = tuple[int, int]  # (offset, length) in bytes


class TraceError(ValueError):
    """The trace file or the reads given are not a valid trace."""


class Trace(NamedTuple):
    image_size: int
    reads: list[Extent]


def trace_path(directory: str | os.PathLike[str], image_name: str) -> Path:
    """``<directory>/<volume-name>.trace.json`` (the name normalised as virtman does);
    ``ValueError`` for a name virtman would refuse."""
    try:
        name = validation.image_name(image_name)
    except VirtmanError as exc:
        raise ValueError(str(exc)) from None
    return Path(directory) / f"{name}.trace.json"


# -- the trace file ----------------------------------------------------------------------------
def _integer(value: object, what: str) -> int:
    if type(value) is not int:  # not bool, not float
        raise TraceError(f"{what} must be an integer, not {value!r}")
    return value


def _image_size(value: object) -> int:
    size = _integer(value, "image_size")
    if size <= 0 or size % SECTOR:
        raise TraceError(f"image_size {size} must be a positive multiple of {SECTOR}")
    return size


def check_reads(reads: Iterable[Any], image_size: int) -> list[Extent]:
    """The reads as ``(offset, length)`` tuples; ``TraceError`` naming the first bad one."""
    size = _image_size(image_size)
    checked: list[Extent] = []
    for i, read in enumerate(reads):
        if len(checked) >= MAX_READS:
            raise TraceError(f"more than {MAX_READS} reads")
        where = f"reads[{i}]"
        if not isinstance(read, list | tuple) or len(read) != 2:
            raise TraceError(f"{where} must be [offset, length], not {read!r}")
        offset = _integer(read[0], f"{where} offset")
        length = _integer(read[1], f"{where} length")
        if offset < 0 or offset % SECTOR:
            raise TraceError(f"{where}: offset {offset} is not a multiple of {SECTOR} >= 0")
        if length <= 0 or length % SECTOR or length > MAX_READ_BYTES:
            raise TraceError(
                f"{where}: length {length} is not a multiple of {SECTOR} in 1..{MAX_READ_BYTES}"
            )
        if offset + length > size:
            raise TraceError(
                f"{where}: [{offset}, {offset + length}) ends beyond the image ({size} bytes)"
            )
        checked.append((offset, length))
    return checked


def parse_trace(document: object) -> Trace:
    """Validate a decoded trace document (keys other than the three are ignored)."""
    if not isinstance(document, dict):
        raise TraceError("a trace is a JSON object {version, image_size, reads}")
    missing = {"version", "image_size", "reads"} - set(document)
    if missing:  # other keys are left to other readers (bench/boottrace.py: issued_at, ...)
        raise TraceError(f"trace keys missing: {sorted(missing)}")
    if type(document["version"]) is not int or document["version"] != TRACE_VERSION:
        raise TraceError(f"version {document['version']!r} (this reads {TRACE_VERSION})")
    size = _image_size(document["image_size"])
    reads = document["reads"]
    if not isinstance(reads, list):
        raise TraceError("reads must be a list of [offset, length]")
    if len(reads) > MAX_READS:
        raise TraceError(f"{len(reads)} reads (at most {MAX_READS})")
    return Trace(size, check_reads(reads, size))


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace file. ``OSError`` if it cannot be read, ``TraceError``
    (a ``ValueError``, with the path in its message) if it is not a valid trace."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_TRACE_FILE_BYTES:
            raise TraceError(f"trace {path}: larger than {MAX_TRACE_FILE_BYTES} bytes")
        data = f.read(MAX_TRACE_FILE_BYTES + 1)
    if len(data) > MAX_TRACE_FILE_BYTES:
        raise TraceError(f"trace {path}: larger than {MAX_TRACE_FILE_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8
        raise TraceError(f"trace {path}: not JSON: {exc}") from None
    try:
        return parse_trace(document)
    except TraceError as exc:
        raise TraceError(f"trace {path}: {exc}") from None


def save_trace(path: str | os.PathLike[str], reads: Iterable[Any], image_size: int) -> Path:
    """Validate ``reads`` (``(offset, length)`` pairs in boot order) and write them as a
    version 1 trace, atomically (a temporary file renamed over ``path``)."""
    checked = check_reads(reads, image_size)
    target = Path(path)
    document = {
        "version": TRACE_VERSION,
        "image_size": image_size,
        "reads": [list(r) for r in checked],
    }
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(document, separators=(",", ":")) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# -- extents -------------------------------------------------------------------------------------
def merge(
    reads: Iterable[Extent], cluster: int = CLUSTER, *, image_size: int | None = None
) -> list[Extent]:
    """The clusters the reads touch, each once, in first-touch order, as cluster-aligned
    ``(offset, length)`` extents (a run of clusters touched one after the other is one
    extent). With ``image_size`` the last cluster is cut at the end of the image."""
    if cluster < SECTOR or cluster & (cluster - 1):
        raise ValueError(f"cluster {cluster} must be a power of two >= {SECTOR}")
    reads = list(reads)
    ends = [o + n for o, n in reads if n > 0]
    if not ends:
        return []
    seen = bytearray(-(-max(ends) // cluster))  # one byte per cluster: 1 = fetched already
    extents: list[list[int]] = []
    for offset, length in reads:
        if length <= 0:
            continue
        c, last = offset // cluster, (offset + length - 1) // cluster + 1
        while (c := seen.find(0, c, last)) >= 0:
            end = seen.find(1, c, last)
            end = last if end < 0 else end
            seen[c:end] = b"\x01" * (end - c)
            start, size = c * cluster, (end - c) * cluster
            if extents and sum(extents[-1]) == start:
                extents[-1][1] += size
            else:
                extents.append([start, size])
            c = end
    if image_size is not None:
        extents = [[o, min(n, image_size - o)] for o, n in extents if o < image_size]
    return [(o, n) for o, n in extents]


def _pieces(extents: Sequence[Extent], chunk: int) -> Iterator[Extent]:
    for offset, length in extents:
        for start in range(offset, offset + length, chunk):
            yield start, min(chunk, offset + length - start)


# -- never twice, paced, idle ------------------------------------------------------------------
class ClusterMap:
    """One byte per cluster of an image: 1 once the cluster is cached, read by the prefetch
    or in flight. ``claim`` hands out the parts of a range still to read and marks them, so
    that no cluster is read twice, whoever asks."""

    def __init__(self, image_size: int, cluster: int = CLUSTER) -> None:
        if image_size <= 0 or cluster < SECTOR or cluster & (cluster - 1):
            raise ValueError(f"image_size {image_size} / cluster {cluster}")
        self.image_size = image_size
        self.cluster = cluster
        self.bits = bytearray(-(-image_size // cluster))

    def mark(self, offset: int, length: int) -> int:
        """Mark the clusters wholly inside ``[offset, offset + length)`` (the image's last,
        short cluster counts as whole); returns how many were new."""
        c = self.cluster
        end = min(offset + length, self.image_size)
        first = -(-max(offset, 0) // c)
        last = -(-end // c) if end == self.image_size else end // c
        if last <= first:
            return 0
        new = self.bits.count(0, first, last)
        self.bits[first:last] = b"\x01" * (last - first)
        return new

    def claim(self, offset: int, length: int) -> list[Extent]:
        """The runs of ``[offset, offset + length)`` whose clusters are not marked yet, now
        marked (cut to the range and to the image's end)."""
        c = self.cluster
        end = min(offset + length, self.image_size)
        if end <= offset:
            return []
        runs: list[Extent] = []
        first, last = offset // c, -(-end // c)
        while (i := self.bits.find(0, first, last)) >= 0:
            j = self.bits.find(1, i, last)
            j = last if j < 0 else j
            self.bits[i:j] = b"\x01" * (j - i)
            start, stop = max(i * c, offset), min(j * c, end)
            runs.append((start, stop - start))
            first = j
        return runs

    def done(self, offset: int, length: int) -> bool:
        """Every cluster the range touches is marked."""
        c = self.cluster
        end = min(offset + length, self.image_size)
        return end <= offset or self.bits.find(0, offset // c, -(-end // c)) < 0


class Pacer:
    """Delay-based pacing of background reads behind everyone else's (after LEDBAT).

    ``done(nbytes, seconds)`` after every fetch: the cost per byte is compared with the
    lowest of the last ``window`` fetches (the link with nobody else on it). A fetch more
    than ``slack`` times that cost queued behind other reads: the pacer then holds every
    reader for ``backoff`` times the delay it saw (at most ``max_pause_s``) and lets only
    one read be in flight until a fetch is fast again. ``gate`` blocks a reader until it
    may read (False once ``stop`` is set)."""

    def __init__(
        self,
        depth: int,
        *,
        slack: float = 2.0,
        backoff: float = 1.0,
        window: int = 32,
        max_pause_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if depth < 1 or slack < 1 or backoff < 0 or window < 1 or max_pause_s < 0:
            raise ValueError("depth >= 1, slack >= 1, backoff >= 0, window >= 1")
        self.depth = depth
        self.slack = slack
        self.backoff = backoff
        self.max_pause_s = max_pause_s
        self.clock = clock
        self.costs: deque[float] = deque(maxlen=window)  # seconds per byte
        self.limit = depth  # reads allowed in flight now
        self.in_flight = 0
        self.resume_at = 0.0  # no read starts before
        self.contended = 0  # fetches that queued (for the log and tests)
        self.paused_s = 0.0
        self._cond = threading.Condition()

    def done(self, nbytes: int, seconds: float) -> float:
        """Account one fetch; returns the pause it imposes (0 when the link was idle)."""
        if nbytes <= 0:
            return 0.0
        cost = max(seconds, 1e-9) / nbytes
        with self._cond:
            base = min(self.costs, default=cost)
            self.costs.append(cost)
            pause = 0.0
            if cost > self.slack * base:
                pause = min(self.max_pause_s, self.backoff * (cost - base) * nbytes)
                self.contended += 1
                self.paused_s += pause
                self.limit = 1
                self.resume_at = max(self.resume_at, self.clock() + pause)
            else:
                self.limit = self.depth
            self._cond.notify_all()
            return pause

    def gate(self, stop: threading.Event) -> bool:
        """Wait for a slot; True with the slot taken (give it back with ``release``)."""
        with self._cond:
            while not stop.is_set():
                wait = self.resume_at - self.clock()
                if wait <= 0 and self.in_flight < self.limit:
                    self.in_flight += 1
                    return True
                self._cond.wait(min(wait, 0.05) if wait > 0 else 0.05)
            return False

    def release(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()


def lower_priority() -> str:
    """Put the calling thread off the CPU others need: SCHED_IDLE, else nice 19. Returns
    what it got ("idle", "nice" or "" when neither was allowed)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return "nice"
    except (AttributeError, OSError):
        return ""


# -- the background reader --------------------------------------------------------------------
class Prefetcher:
    """Reads one image's trace, as merged extents, from its origin in the background."""

    def __init__(
        self,
        image: str,
        origin_path: str,
        trace_file: str | os.PathLike[str],
        *,
        image_size: int | None = None,
        depth: int = 2,
        pause_s: float = 0.0,
        observer: Callable[[int, int], None] | None = None,
        cached: Callable[[], Iterable[Extent]] | None = None,
        pacer: Pacer | None = None,
        idle: bool = False,
    ) -> None:
        """``image_size``: the origin's size (a trace of another size is not used);
        ``depth``: reads in flight (1-4); ``pause_s``: each reader's pause after a read;
        ``observer(offset, length)``: called after every read (tests, progress);
        ``cached()``: the extents the cache holds already (skipped; asked at most every
        ``CACHED_REFRESH_S``); ``pacer``: paces the reads behind other traffic;
        ``idle``: the readers run ``SCHED_IDLE`` (``lower_priority``)."""
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth {depth} must be 1-{MAX_DEPTH}")
        if pause_s < 0:
            raise ValueError(f"pause_s {pause_s} must be >= 0")
        self.image = image
        self.origin_path = origin_path
        self.trace_file = Path(trace_file)
        self.image_size = image_size
        self.depth = depth
        self.pause_s = pause_s
        self.observer = observer
        self.cached = cached
        self.pacer = pacer
        self.idle = idle
        self.clusters: ClusterMap | None = None
        self._cached_at = -CACHED_REFRESH_S  # monotonic time of the last ``cached()``
        self.skipped_bytes = 0  # planned but cached already (by the VM's reads)
        self.state = "new"  # running, finished, stopped, failed
        self.error: str | None = None
        self.extents = 0  # merged extents planned
        self.planned_bytes = 0
        self.bytes_read = 0
        self.reads = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"prefetch-{image}", daemon=True)

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> Prefetcher:
        self.state = "running"
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the readers to stop before their next read (does not wait)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every read to end; True when the prefetch is over."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float | None = STOP_TIMEOUT_S) -> bool:
        """Stop and wait (bounded) for the reads in flight; True when the prefetch is over."""
        self.request_stop()
        return self.wait(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        started = time.monotonic()
        try:
            extents = self._plan()
            if not extents:
                self.state = "finished"
                LOG.info("%s: prefetch: the trace reads nothing", self.image)
                return
            fd = os.open(self.origin_path, os.O_RDONLY | os.O_CLOEXEC)
        except Exception as exc:  # a bad or unreadable trace, no origin: no prefetch
            self._fail(f"{exc}")
            self._log_end(started)
            return
        try:
            with contextlib.suppress(OSError):  # the extents only: no readahead around them
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            LOG.info(
                "%s: prefetch started: %d extents, %d bytes from %s (depth %d)",
                self.image,
                self.extents,
                self.planned_bytes,
                self.origin_path,
                self.depth,
            )
            pieces = _pieces(extents, READ_CHUNK)
            assert self.clusters is not None
            helpers = [
                threading.Thread(
                    target=self._read, args=(fd, pieces), name=f"prefetch-{self.image}-{i}"
                )
                for i in range(1, self.depth)
            ]
            started_helpers = []
            for helper in helpers:
                helper.daemon = True
                try:
                    helper.start()
                except RuntimeError as exc:  # no more threads: fewer reads in flight
                    LOG.warning("%s: prefetch helper not started: %s", self.image, exc)
                    break
                started_helpers.append(helper)
            self._read(fd, pieces)
            for helper in started_helpers:
                helper.join()
        finally:
            os.close(fd)
        if self.state == "running":  # a stop asked after the last read changes nothing
            covered = self.bytes_read + self.skipped_bytes
            self.state = "finished" if covered >= self.planned_bytes else "stopped"
        self._log_end(started)

    def _plan(self) -> list[Extent]:
        trace = load_trace(self.trace_file)
        if self.image_size is not None and trace.image_size != self.image_size:
            raise TraceError(
                f"trace {self.trace_file} is of a {trace.image_size}-byte image, "
                f"the origin has {self.image_size} bytes"
            )
        extents = merge(trace.reads, image_size=trace.image_size)
        self.clusters = ClusterMap(trace.image_size)
        self.extents = len(extents)
        self.planned_bytes = sum(n for _, n in extents)
        return extents

    def _refresh_cached(self) -> None:
        """Mark what the cache holds (the VM's reads fetched it): at most every
        ``CACHED_REFRESH_S``; called with ``_lock`` held. A failure is logged, not fatal."""
        now = time.monotonic()
        if self.cached is None or now - self._cached_at < CACHED_REFRESH_S:
            return
        self._cached_at = now
        assert self.clusters is not None
        try:
            for offset, length in self.cached():
                self.clusters.mark(offset, length)
        except Exception as exc:
            LOG.warning("%s: prefetch: the cache's map is unknown: %s", self.image, exc)

    def _next(self, pieces: Iterator[Extent]) -> list[Extent] | None:
        """The runs of the next piece still to read (claimed); None when none is left."""
        assert self.clusters is not None
        with self._lock:
            self._refresh_cached()
            while (piece := next(pieces, None)) is not None:
                runs = self.clusters.claim(*piece)
                self.skipped_bytes += piece[1] - sum(n for _, n in runs)
                if runs:
                    return runs
            return None

    def _read(self, fd: int, pieces: Iterator[Extent]) -> None:
        if self.idle:
            lower_priority()
        buffer = bytearray(READ_CHUNK)  # reused: memory is depth x READ_CHUNK at most
        while not self._stop.is_set() and self.state == "running":
            runs = self._next(pieces)
            if runs is None:
                return
            for offset, length in runs:
                if self.pacer is not None and not self.pacer.gate(self._stop):
                    return
                try:
                    started = time.monotonic()
                    try:
                        got = os.preadv(fd, [memoryview(buffer)[:length]], offset)
                    finally:
                        if self.pacer is not None:
                            self.pacer.release()
                    if got != length:
                        raise OSError(f"short read: {got} bytes")
                    if self.pacer is not None:
                        self.pacer.done(length, time.monotonic() - started)
                    with self._lock:
                        self.bytes_read += length
                        self.reads += 1
                    if self.observer is not None:
                        self.observer(offset, length)
                except Exception as exc:
                    self._fail(f"read of {length} bytes at {offset}: {exc}")
                    return
                if self.pause_s:
                    self._stop.wait(self.pause_s)
                if self._stop.is_set():
                    return

    def _fail(self, error: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
                self.state = "failed"

    def _log_end(self, started: float) -> None:
        seconds = time.monotonic() - started
        if self.state == "finished":
            LOG.info(
                "%s: prefetch finished: %d extents, %d bytes in %.2f s "
                "(%d bytes cached already; %d fetches queued, paused %.2f s)",
                self.image,
                self.extents,
                self.bytes_read,
                seconds,
                self.skipped_bytes,
                self.pacer.contended if self.pacer else 0,
                self.pacer.paused_s if self.pacer else 0.0,
            )
        elif self.state == "stopped":
            LOG.info(
                "%s: prefetch stopped after %d of %d bytes (%.2f s)",
                self.image,
                self.bytes_read,
                self.planned_bytes,
                seconds,
            )
        else:
            LOG.warning(
                "%s: prefetch aborted after %d of %d bytes (%.2f s): %s",
                self.image,
                self.bytes_read,
                self.planned_bytes,
                seconds,
                self.error,
            )


# -- what BaseImage uses ------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefetchOptions:
    """Where traces are and how to replay them (``prefetch_*`` options)."""

    directory: Path
    depth: int = 2
    pause_s: float = 0.0
    stop_timeout_s: float = STOP_TIMEOUT_S
    pace: bool = True  # a Pacer behind the other reads on the link
    idle: bool = True  # SCHED_IDLE readers

    def start(
        self,
        image: str,
        origin: Device,
        cached: Callable[[], Iterable[Extent]] | None = None,
    ) -> Prefetcher | None:
        """Start prefetching ``image`` from ``origin`` if it has a trace (None if not);
        ``cached()``: the extents the image's cache holds (skipped)."""
        trace = trace_path(self.directory, image)
        if not trace.is_file():
            LOG.debug("%s: no trace at %s: no prefetch", image, trace)
            return None
        return Prefetcher(
            image,
            origin.path,
            trace,
            image_size=origin.size,
            depth=self.depth,
            pause_s=self.pause_s,
            cached=cached,
            pacer=Pacer(self.depth) if self.pace else None,
            idle=self.idle,
        ).start()


def options_from(settings: Settings) -> PrefetchOptions | None:
    """The ``Settings``' prefetch options; None when ``prefetch_dir`` is unset (no prefetch)."""
    if settings.prefetch_dir is None:
        return None
    return PrefetchOptions(
        settings.prefetch_dir,
        depth=settings.prefetch_depth,
        pause_s=settings.prefetch_pause_ms / 1000.0,
    )
