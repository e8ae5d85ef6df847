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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
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
    ) -> None:
        """``image_size``: the origin's size (a trace of another size is not used);
        ``depth``: reads in flight (1-4); ``pause_s``: each reader's pause after a read;
        ``observer(offset, length)``: called after every read (tests, progress)."""
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
            self.state = "finished" if self.bytes_read == self.planned_bytes else "stopped"
        self._log_end(started)

    def _plan(self) -> list[Extent]:
        trace = load_trace(self.trace_file)
        if self.image_size is not None and trace.image_size != self.image_size:
            raise TraceError(
                f"trace {self.trace_file} is of a {trace.image_size}-byte image, "
                f"the origin has {self.image_size} bytes"
            )
        extents = merge(trace.reads, image_size=trace.image_size)
        self.extents = len(extents)
        self.planned_bytes = sum(n for _, n in extents)
        return extents

    def _read(self, fd: int, pieces: Iterator[Extent]) -> None:
        while not self._stop.is_set() and self.state == "running":
            with self._lock:
                piece = next(pieces, None)
            if piece is None:
                return
            offset, length = piece
            try:
                got = len(os.pread(fd, length, offset))
                if got != length:
                    raise OSError(f"short read: {got} bytes")
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

    def _fail(self, error: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
                self.state = "failed"

    def _log_end(self, started: float) -> None:
        seconds = time.monotonic() - started
        if self.state == "finished":
            LOG.info(
                "%s: prefetch finished: %d extents, %d bytes in %.2f s",
                self.image,
                self.extents,
                self.bytes_read,
                seconds,
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

    def start(self, image: str, origin: Device) -> Prefetcher | None:
        """Start prefetching ``image`` from ``origin`` if it has a trace (None if not)."""
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
