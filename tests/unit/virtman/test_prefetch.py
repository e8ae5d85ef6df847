"""Prefetch: the trace file, merging into clusters, the background reader (on real files),
and its place in a BaseImage's life (over the in-memory fakes)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from brick.wait import wait_until
from tests.unit.fakes.driver import FakeDriver
from tests.unit.fakes.settings import CONN, settings
from tests.unit.fakes.volt import FakeVolt, ready
from virtman import prefetch
from virtman.baseimage import BaseImage, Status
from virtman.compute import Virtman
from virtman.journal import Journal
from virtman.layers.base import CacheSpec, Device, Endpoint
from virtman.prefetch import (
    CLUSTER,
    Prefetcher,
    PrefetchOptions,
    TraceError,
    load_trace,
    merge,
    save_trace,
    trace_path,
)
from voltclient.client import Volume

MIB = 1 << 20
IMAGE = "volume-img"  # what the fakes build (1 MiB images)


def write_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    wait_until(predicate, timeout_s=timeout_s, what="the condition")


# -- the trace file ----------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.trace.json"
    assert save_trace(path, [(4096, 512), [0, 8192]], 4 * MIB) == path
    assert json.loads(path.read_text()) == {
        "version": 1,
        "image_size": 4 * MIB,
        "reads": [[4096, 512], [0, 8192]],
    }
    trace = load_trace(path)
    assert trace.image_size == 4 * MIB and trace.reads == [(4096, 512), (0, 8192)]
    image_size, reads = trace  # a plain pair too
    assert (image_size, reads) == (4 * MIB, [(4096, 512), (0, 8192)])
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace.json"]  # no temporary left


def test_an_empty_trace_is_valid(tmp_path: Path) -> None:
    save_trace(tmp_path / "t.json", [], MIB)
    assert load_trace(tmp_path / "t.json").reads == []


def test_other_keys_are_left_to_other_readers(tmp_path: Path) -> None:
    path = tmp_path / "boot-trace.json"  # as bench/boottrace.py writes it
    document = {"version": 1, "image_size": MIB, "reads": [[0, 512]], "issued_at": [0.0]}
    path.write_text(json.dumps({**document, "boot_s": 1.5}))
    assert load_trace(path) == (MIB, [(0, 512)])


GOOD = {"version": 1, "image_size": MIB, "reads": [[0, 512]]}


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ([], "JSON object"),
        ({"version": 1, "image_size": MIB}, "missing: ['reads']"),
        ({**GOOD, "version": 2}, "version 2"),
        ({**GOOD, "version": True}, "version True"),
        ({**GOOD, "image_size": 0}, "image_size 0"),
        ({**GOOD, "image_size": 1000}, "multiple of 512"),
        ({**GOOD, "image_size": "1048576"}, "image_size must be an integer"),
        ({**GOOD, "image_size": 1048576.0}, "image_size must be an integer"),
        ({**GOOD, "reads": {"0": 512}}, "reads must be a list"),
        ({**GOOD, "reads": [[0, 512], [512]]}, "reads[1] must be [offset, length]"),
        ({**GOOD, "reads": [[0, 512, 3]]}, "reads[0] must be"),
        ({**GOOD, "reads": [[-512, 512]]}, "reads[0]: offset -512"),
        ({**GOOD, "reads": [[100, 512]]}, "reads[0]: offset 100 is not a multiple of 512"),
        ({**GOOD, "reads": [[0, 0]]}, "reads[0]: length 0"),
        ({**GOOD, "reads": [[0, 700]]}, "length 700 is not a multiple of 512"),
        ({**GOOD, "reads": [[0, 512], [0.0, 512]]}, "reads[1] offset must be an integer"),
        ({**GOOD, "reads": [[0, False]]}, "reads[0] length must be an integer"),
        ({**GOOD, "reads": [[MIB - 512, 1024]]}, "ends beyond the image (1048576 bytes)"),
        ({**GOOD, "reads": [[MIB, 512]]}, "ends beyond the image"),
    ],
)
def test_invalid_traces_are_refused_clearly(tmp_path: Path, document: object, error: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert str(path) in str(info.value)
    assert error in str(info.value)


@pytest.mark.parametrize("text", ["", "{", "not json", '{"version": 1,}', "\xff"])
def test_a_file_that_is_not_json_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(TraceError, match="not JSON"):
        load_trace(path)


def test_count_and_size_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.json"
    save_trace(path, [(0, 512)] * 5, MIB)
    monkeypatch.setattr(prefetch, "MAX_READS", 4)
    with pytest.raises(TraceError, match=r"5 reads \(at most 4\)"):
        load_trace(path)
    with pytest.raises(TraceError, match="more than 4 reads"):
        save_trace(path, iter([(0, 512)] * 5), MIB)  # a generator is counted as it goes
    monkeypatch.setattr(prefetch, "MAX_TRACE_FILE_BYTES", 16)
    with pytest.raises(TraceError, match="larger than 16 bytes"):
        load_trace(path)
    with pytest.raises(TraceError, match="length 134217728"):
        save_trace(path, [(0, 128 * MIB)], 256 * MIB)


def test_save_refuses_a_bad_trace_and_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    save_trace(path, [(0, 512)], MIB)
    with pytest.raises(TraceError, match="ends beyond the image"):
        save_trace(path, [(0, 512), (MIB, 512)], MIB)
    assert load_trace(path).reads == [(0, 512)]


def test_a_missing_trace_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "none.json")


def test_trace_path_normalises_the_image_name(tmp_path: Path) -> None:
    assert trace_path(tmp_path, "image1") == tmp_path / "volume-image1.trace.json"
    assert trace_path(tmp_path, "volume-image1") == tmp_path / "volume-image1.trace.json"
    with pytest.raises(ValueError):
        trace_path(tmp_path, "../etc")


# -- merge -------------------------------------------------------------------------------------
def test_merge_keeps_first_touch_order_and_touches_each_cluster_once() -> None:
    c = CLUSTER
    reads = [
        (5 * c + 512, 512),  # cluster 5
        (0, 4096),  # cluster 0
        (5 * c, c),  # cluster 5 again: nothing new
        (512, 1024),  # cluster 0 again
        (6 * c - 512, 1024),  # straddles 5|6: 6 is new (after 0, so an extent of its own)
        (c, 2 * c),  # clusters 1, 2
        (3 * c, 512),  # cluster 3 right after 2: the same extent
        (9 * c, 3 * c),  # 9, 10, 11
        (8 * c, 5 * c),  # 8 and 12 are new, 9-11 seen: two extents
    ]
    assert merge(reads) == [
        (5 * c, c),
        (0, c),
        (6 * c, c),
        (c, 3 * c),
        (9 * c, 3 * c),
        (8 * c, c),
        (12 * c, c),
    ]


def test_merge_runs_of_clusters_and_the_image_end() -> None:
    c = CLUSTER
    sequential = [(i * 4096, 4096) for i in range(64)]  # 256 KiB read in 4 KiB pieces
    assert merge(sequential) == [(0, 4 * c)]
    assert merge([(0, 512), (c, 512), (2 * c, 512)]) == [(0, 3 * c)]
    assert merge([(2 * c, 512), (c, 512), (0, 512)]) == [(2 * c, c), (c, c), (0, c)]
    assert merge([(c + 1024, 512)], image_size=c + 4096) == [(c, 4096)]
    assert merge([(0, 512)], cluster=4096) == [(0, 4096)]
    assert merge([]) == []
    with pytest.raises(ValueError):
        merge([(0, 512)], cluster=3000)


def test_merge_of_a_large_trace_is_fast() -> None:
    reads = [((i * 7919) % 16384 * 512, 4096) for i in range(200_000)]
    started = time.monotonic()
    extents = merge(reads, image_size=16 * MIB)
    assert time.monotonic() - started < 5
    assert sum(n for _, n in extents) == 8 * MIB + CLUSTER  # every cluster touched, once
    assert len({o for o, _ in extents}) == len(extents)


# -- the background reader (real files) --------------------------------------------------------
class Recorder:
    """Records the reads; ``hold_after`` reads in, it blocks until released."""

    def __init__(self, hold_after: int | None = None) -> None:
        self.reads: list[tuple[int, int]] = []
        self.hold_after = hold_after
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0

    def __call__(self, offset: int, length: int) -> None:
        with self.lock:
            self.reads.append((offset, length))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            count = len(self.reads)
        try:
            if self.hold_after is not None and count >= self.hold_after:
                self.held.set()
                assert self.release.wait(10)
        finally:
            with self.lock:
                self.active -= 1


def make_trace(tmp_path: Path, reads: list[tuple[int, int]], size: int = 4 * MIB) -> Path:
    return save_trace(tmp_path / "img.trace.json", reads, size)


def test_the_prefetcher_reads_exactly_the_merged_extents_in_order(tmp_path: Path) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, 4 * MIB)
    c = CLUSTER
    trace = make_trace(tmp_path, [(10 * c, 4096), (0, 512), (10 * c, 512), (3 * c, 2 * c)])
    recorder = Recorder()
    p = Prefetcher("img", str(origin), trace, image_size=4 * MIB, depth=1, observer=recorder)
    assert p.start() is p
    assert p.wait(10)
    assert recorder.reads == [(10 * c, c), (0, c), (3 * c, 2 * c)]
    assert p.state == "finished" and p.error is None
    assert (p.extents, p.bytes_read, p.reads) == (3, 4 * c, 3)
    assert p._thread.name == "prefetch-img" and p._thread.daemon


def test_long_extents_are_read_in_pieces_of_at_most_one_mib(tmp_path: Path) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, 4 * MIB)
    recorder = Recorder()
    trace = make_trace(tmp_path, [(0, 2 * MIB + 4096)])
    p = Prefetcher("img", str(origin), trace, depth=1, observer=recorder).start()
    assert p.wait(10) and p.state == "finished"
    assert recorder.reads == [(0, MIB), (MIB, MIB), (2 * MIB, CLUSTER)]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_at_most_depth_reads_are_in_flight(tmp_path: Path, depth: int) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, 4 * MIB)
    extents = [(i * 2 * CLUSTER, CLUSTER) for i in range(24)]  # 24 separate extents
    recorder = Recorder(hold_after=depth)
    p = Prefetcher(
        "img", str(origin), make_trace(tmp_path, extents), depth=depth, observer=recorder
    ).start()
    assert recorder.held.wait(10)
    # Every reader is a thread of its own, all started before the first read; once
    # ``depth`` of them are held inside a read, no other reader exists to make one.
    wait_for(lambda: recorder.active == depth)
    readers = [t for t in threading.enumerate() if t.name.startswith("prefetch-img")]
    assert len(readers) == depth
    assert recorder.most_active == depth
    recorder.release.set()
    assert p.wait(10) and p.state == "finished"
    assert sorted(recorder.reads) == extents
    names = {t.name for t in threading.enumerate()}
    assert not {n for n in names if n.startswith("prefetch-img")}


def test_a_stop_request_ends_it_between_two_reads(tmp_path: Path) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, 4 * MIB)
    extents = [(i * 2 * CLUSTER, CLUSTER) for i in range(20)]
    recorder = Recorder(hold_after=3)
    p = Prefetcher(
        "img", str(origin), make_trace(tmp_path, extents), depth=1, observer=recorder
    ).start()
    assert recorder.held.wait(10)
    p.request_stop()
    assert not p.wait(0.1)  # the read in flight ends first
    recorder.release.set()
    assert p.wait(5)
    assert p.state == "stopped"
    assert recorder.reads == extents[:3] and p.bytes_read == 3 * CLUSTER


def test_a_stop_during_the_pause_is_prompt(tmp_path: Path, caplog) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, MIB)
    recorder = Recorder()
    trace = make_trace(tmp_path, [(0, 512), (4 * CLUSTER, 512)], MIB)
    p = Prefetcher("img", str(origin), trace, pause_s=60, depth=1, observer=recorder)
    with caplog.at_level(logging.INFO, logger="virtman.prefetch"):
        p.start()
        wait_for(lambda: len(recorder.reads) == 1)
        started = time.monotonic()
        assert p.stop(5)
        assert time.monotonic() - started < 2
    assert p.state == "stopped" and recorder.reads == [(0, CLUSTER)]
    assert "prefetch stopped after 65536 of 131072 bytes" in caplog.text


def test_the_pause_spaces_the_reads(tmp_path: Path) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, MIB)
    trace = make_trace(tmp_path, [(i * 2 * CLUSTER, 512) for i in range(4)], MIB)
    started = time.monotonic()
    p = Prefetcher("img", str(origin), trace, pause_s=0.1, depth=1).start()
    assert p.wait(10) and p.state == "finished"
    assert time.monotonic() - started >= 0.35


def test_a_read_error_ends_the_prefetch_and_is_logged(tmp_path: Path, caplog) -> None:
    origin = tmp_path / "short.raw"
    write_file(origin, 3 * CLUSTER)  # shorter than the trace says: the 3rd extent fails
    extents = [(0, CLUSTER), (2 * CLUSTER, CLUSTER), (5 * CLUSTER, CLUSTER), (7 * CLUSTER, CLUSTER)]
    recorder = Recorder()
    trace = make_trace(tmp_path, extents, MIB)
    with caplog.at_level(logging.INFO, logger="virtman.prefetch"):
        p = Prefetcher("img", str(origin), trace, depth=1, observer=recorder).start()
        assert p.wait(10)
    assert p.state == "failed" and recorder.reads == extents[:2]
    assert p.error == f"read of 65536 bytes at {5 * CLUSTER}: short read: 0 bytes"
    assert "prefetch aborted after 131072 of 262144 bytes" in caplog.text


def test_an_origin_that_cannot_be_read_fails_the_prefetch_only(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    trace = make_trace(tmp_path, [(0, 512)])
    p = Prefetcher("img", str(tmp_path / "dir"), trace).start()  # EISDIR on read
    assert p.wait(10) and p.state == "failed" and "Is a directory" in (p.error or "")
    p = Prefetcher("img", str(tmp_path / "none"), trace).start()  # ENOENT on open
    assert p.wait(10) and p.state == "failed" and "No such file" in (p.error or "")


def test_a_bad_trace_or_one_of_another_size_is_not_used(tmp_path: Path, caplog) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, MIB)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1}')
    with caplog.at_level(logging.WARNING, logger="virtman.prefetch"):
        p = Prefetcher("img", str(origin), bad).start()
        assert p.wait(10) and p.state == "failed"
    assert "missing: ['image_size', 'reads']" in caplog.text
    other = make_trace(tmp_path, [(0, 512)], 2 * MIB)
    p = Prefetcher("img", str(origin), other, image_size=MIB).start()
    assert p.wait(10) and p.state == "failed" and "2097152-byte image" in (p.error or "")


def test_bad_arguments() -> None:
    for depth in (0, 5):
        with pytest.raises(ValueError, match="depth"):
            Prefetcher("img", "/x", "/t", depth=depth)
    with pytest.raises(ValueError, match="pause_s"):
        Prefetcher("img", "/x", "/t", pause_s=-1)
    assert Prefetcher("img", "/x", "/t").stop(0)  # never started: nothing to wait for


# -- with BaseImage and Virtman (fakes) --------------------------------------------------------
@dataclass(frozen=True)
class Observed(PrefetchOptions):
    """PrefetchOptions whose prefetcher reports every read to ``observer``."""

    observer: Callable[[int, int], None] | None = None

    def start(self, image: str, origin: Device, cached=None) -> Prefetcher | None:
        return Prefetcher(
            image,
            origin.path,
            trace_path(self.directory, image),
            image_size=origin.size,
            depth=self.depth,
            observer=self.observer,
        ).start()


def real_origin(driver: FakeDriver, path: Path) -> None:
    """Make the fake cache layer hand out ``path`` (a real 1 MiB file) as the origin."""
    write_file(path, MIB)
    ensure = driver.cache.ensure

    def with_file(spec: CacheSpec) -> Device:
        device = replace(ensure(spec), path=str(path))
        driver.state.caches[spec.image] = device
        return device

    driver.cache.ensure = with_file  # type: ignore[method-assign]


def base_image(tmp_path: Path, options: PrefetchOptions | None, host_ip: str = "10.0.0.9"):
    driver, volt = FakeDriver(), FakeVolt()
    real_origin(driver, tmp_path / "origin.raw")
    base = BaseImage(
        IMAGE,
        [Endpoint("10.0.0.1:3260", "iqn.2010-10.org.openstack:volume-img")],
        driver=driver,  # type: ignore[arg-type]
        volt=volt,  # type: ignore[arg-type]
        journal=Journal(tmp_path / "journal.json"),
        host_ip=host_ip,
        parent_wait_timeout=1,
        prefetch=options,
    )
    return base, driver


def traces(tmp_path: Path) -> Path:
    d = tmp_path / "traces"
    d.mkdir(exist_ok=True)
    save_trace(d / "volume-img.trace.json", [(i * 2 * CLUSTER, 4096) for i in range(8)], MIB)
    return d


def test_a_new_stack_with_a_trace_is_prefetched(tmp_path: Path) -> None:
    recorder = Recorder()
    base, _ = base_image(tmp_path, Observed(traces(tmp_path), depth=1, observer=recorder))
    base.instances.add("vm1")
    base.ensure_built()
    assert base.prefetcher is not None and base.prefetcher.wait(10)
    assert base.prefetcher.state == "finished"
    assert recorder.reads == [(i * 2 * CLUSTER, CLUSTER) for i in range(8)]


def test_no_trace_no_option_or_a_local_image_no_prefetch(tmp_path: Path) -> None:
    base, _ = base_image(tmp_path, PrefetchOptions(tmp_path / "empty"))
    base.ensure_built()
    assert base.status == Status.OK and base.prefetcher is None
    base, _ = base_image(tmp_path, None)
    base.ensure_built()
    assert base.prefetcher is None
    base, _ = base_image(tmp_path, PrefetchOptions(traces(tmp_path)), host_ip="10.0.0.1")
    base.ensure_built()
    assert base.local and base.prefetcher is None


def test_a_broken_trace_never_fails_the_create(tmp_path: Path) -> None:
    d = tmp_path / "traces"
    d.mkdir()
    (d / "volume-img.trace.json").write_text("garbage")
    base, _ = base_image(tmp_path, PrefetchOptions(d))
    assert base.ensure_built().path == str(tmp_path / "origin.raw")
    assert base.prefetcher is not None and base.prefetcher.wait(10)
    assert base.prefetcher.state == "failed" and base.status == Status.OK


def test_teardown_waits_for_the_read_in_flight(tmp_path: Path) -> None:
    recorder = Recorder(hold_after=2)
    base, driver = base_image(tmp_path, Observed(traces(tmp_path), depth=1, observer=recorder))
    base.ensure_built()
    assert recorder.held.wait(10)
    seen_at_release: list[bool] = []
    result: list[bool] = []
    teardown = threading.Thread(target=lambda: result.append(base.teardown_if_unused()))
    prefetcher = base.prefetcher
    assert prefetcher is not None
    waiting, wait = threading.Event(), prefetcher.wait

    def watched_wait(timeout: float | None = None) -> bool:
        waiting.set()
        return wait(timeout)

    prefetcher.wait = watched_wait  # type: ignore[method-assign]
    teardown.start()
    assert waiting.wait(10)  # the teardown waits for the held read: nothing is torn down yet
    assert teardown.is_alive() and IMAGE in driver.state.caches and IMAGE in driver.state.relays
    seen_at_release.append(IMAGE in driver.state.caches)
    recorder.release.set()
    teardown.join(10)
    assert result == [True] and seen_at_release == [True]
    assert driver.empty() and base.prefetcher is None
    assert recorder.reads == [(0, CLUSTER), (2 * CLUSTER, CLUSTER)]  # stopped: no more reads


def test_a_read_that_never_ends_holds_the_stack_unless_forced(tmp_path: Path, caplog) -> None:
    recorder = Recorder(hold_after=1)
    options = Observed(traces(tmp_path), observer=recorder, stop_timeout_s=0.2)
    base, driver = base_image(tmp_path, options)
    base.ensure_built()
    assert recorder.held.wait(10)
    assert base.teardown_if_unused() is False
    assert base.status == Status.DESTROYING and IMAGE in driver.state.caches
    assert "teardown waits" in caplog.text
    assert base.teardown_if_unused(force=True) is True
    assert driver.empty()
    recorder.release.set()


def test_virtman_prefetches_new_stacks_but_not_adopted_ones(tmp_path: Path, caplog) -> None:
    driver, volt = FakeDriver(), FakeVolt()
    real_origin(driver, tmp_path / "origin.raw")
    s = replace(settings(tmp_path), prefetch_dir=traces(tmp_path), prefetch_depth=3)
    vm = Virtman(settings=s, driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="virtman.prefetch"):
        assert vm.create("vm1", "img", CONN).startswith("0:")
        first = vm.images[IMAGE].prefetcher
        assert first is not None and first.depth == 3 and first.wait(10)
    assert first.state == "finished" and first.bytes_read == 8 * CLUSTER
    assert "volume-img: prefetch started: 8 extents, 524288 bytes" in caplog.text
    assert "volume-img: prefetch finished: 8 extents, 524288 bytes in" in caplog.text
    vm.close()
    again = Virtman(settings=s, driver=driver, volt=volt, heartbeat=False)  # type: ignore[arg-type]
    assert again.list() == ["vm1:volume-img"]
    assert again.images[IMAGE].prefetcher is None  # adopted: its cache is warm already
    assert again.destroy("vm1") == "0:"
    again.heartbeat()
    assert driver.empty()


def test_options_from_settings(tmp_path: Path) -> None:
    assert prefetch.options_from(settings(tmp_path)) is None
    s = replace(settings(tmp_path), prefetch_dir=tmp_path, prefetch_pause_ms=250)
    assert prefetch.options_from(s) == PrefetchOptions(tmp_path, depth=2, pause_s=0.25)


def test_under_a_pending_parent_the_prefetch_waits_for_it(tmp_path: Path) -> None:
    """A node placed in a burst under a parent still building reads from the image server
    meanwhile; its prefetch starts only once the parent is ready (then reads from it)."""
    recorder = Recorder()
    base, _ = base_image(tmp_path, Observed(traces(tmp_path), depth=1, observer=recorder))
    pending = Volume("10.0.0.7", None, None, None, "pending", "10.0.0.7:volume-img", None)
    base.volt.parents[IMAGE] = [pending]  # type: ignore[attr-defined]
    base.instances.add("vm1")
    base.ensure_built()
    assert base.following and base.prefetcher is None and base.prefetch_waits
    base.apply_parents([pending])  # still pending: still waiting
    assert base.prefetcher is None
    base.apply_parents([ready("10.0.0.7", IMAGE)])
    assert [e.peer_id for e in base.upstream] == ["10.0.0.7:volume-img"]
    assert base.prefetcher is not None and base.prefetcher.wait(10)
    assert recorder.reads == [(i * 2 * CLUSTER, CLUSTER) for i in range(8)]


# -- never twice, paced, idle (issue 15) -------------------------------------------------------
def test_the_cluster_map_claims_each_cluster_once() -> None:
    c = CLUSTER
    m = prefetch.ClusterMap(10 * c + 4096)  # the last cluster is short
    assert m.claim(0, 2 * c) == [(0, 2 * c)]
    assert m.claim(c, 2 * c) == [(2 * c, c)]  # cluster 1 is taken already
    assert m.claim(0, 3 * c) == []
    assert m.mark(4 * c + 512, 2 * c) == 1  # only cluster 5 lies wholly inside
    assert m.claim(4 * c, 3 * c) == [(4 * c, c), (6 * c, c)]
    assert m.done(4 * c, 3 * c) and not m.done(0, 4 * c)  # cluster 3 was never claimed
    assert m.mark(10 * c, 4096) == 1  # the image's short last cluster counts as whole
    assert m.claim(9 * c, 2 * c) == [(9 * c, c)]  # cut at the image's end
    assert m.claim(7 * c + 512, 512) == [(7 * c + 512, 512)]  # cut to the range asked
    with pytest.raises(ValueError):
        prefetch.ClusterMap(0)


def test_clusters_the_cache_holds_are_skipped_not_read(tmp_path: Path) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, 4 * MIB)
    c = CLUSTER
    extents = [(i * 2 * c, c) for i in range(8)]
    asked = []

    def cached() -> list[tuple[int, int]]:  # the VM read clusters 2, 6 and 10 meanwhile
        asked.append(1)
        return [(2 * c, c), (6 * c, c), (10 * c, c)]

    recorder = Recorder()
    trace = make_trace(tmp_path, extents)
    p = Prefetcher("img", str(origin), trace, depth=2, observer=recorder, cached=cached)
    assert p.start().wait(10) and p.state == "finished"
    assert sorted(recorder.reads) == [e for e in extents if e[0] not in (2 * c, 6 * c, 10 * c)]
    assert p.bytes_read == 5 * c and p.skipped_bytes == 3 * c
    assert len(asked) == 1  # at most every CACHED_REFRESH_S


def test_a_failing_cache_map_only_costs_the_skipping(tmp_path: Path, caplog) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, MIB)

    def cached() -> list[tuple[int, int]]:
        raise OSError("qemu-img: no such file")

    with caplog.at_level(logging.WARNING, logger="virtman.prefetch"):
        p = Prefetcher("img", str(origin), make_trace(tmp_path, [(0, 512)], MIB), cached=cached)
        assert p.start().wait(10) and p.state == "finished" and p.bytes_read == CLUSTER
    assert "the cache's map is unknown: qemu-img: no such file" in caplog.text


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_pacer_pauses_for_the_queueing_it_saw_and_drops_to_one_read() -> None:
    clock = Clock()
    pacer = prefetch.Pacer(3, slack=2.0, backoff=1.0, max_pause_s=5.0, clock=clock)
    stop = threading.Event()
    assert pacer.done(MIB, 0.5) == 0.0  # the first fetch is the base: 0.5 s per MiB
    assert pacer.done(MIB, 0.9) == 0.0  # within 2x: the link was idle
    assert pacer.limit == 3
    assert pacer.done(MIB, 2.0) == pytest.approx(1.5)  # queued 1.5 s behind others
    assert (pacer.limit, pacer.contended) == (1, 1)
    assert pacer.resume_at == pytest.approx(101.5)
    clock.now = 101.6
    assert pacer.gate(stop) and pacer.in_flight == 1
    slot = threading.Event()

    def second() -> None:
        if pacer.gate(stop):
            slot.set()

    t = threading.Thread(target=second)
    t.start()
    assert not slot.wait(0.2)  # one read in flight while the link is contended
    pacer.release()
    assert slot.wait(5)  # the first read's slot is the second's
    t.join()
    pacer.release()
    assert pacer.done(MIB, 0.5) == 0.0 and pacer.limit == 3  # fast again: full depth
    assert pacer.done(MIB, 100.0) == 5.0  # at most max_pause_s
    assert pacer.paused_s == pytest.approx(6.5)


def test_a_stop_ends_a_wait_at_the_gate() -> None:
    clock = Clock()
    pacer = prefetch.Pacer(1, max_pause_s=60, clock=clock)
    pacer.done(MIB, 0.1)
    pacer.done(MIB, 30.0)  # a pause of 29.9 s
    stop = threading.Event()
    result = []
    t = threading.Thread(target=lambda: result.append(pacer.gate(stop)))
    t.start()
    assert not threading.Event().wait(0.1) and not result  # still held at the gate
    stop.set()
    t.join(2)
    assert result == [False] and pacer.in_flight == 0


def test_pacer_arguments() -> None:
    for bad in ({"slack": 0.5}, {"backoff": -1}, {"window": 0}):
        with pytest.raises(ValueError):
            prefetch.Pacer(2, **bad)
    with pytest.raises(ValueError):
        prefetch.Pacer(0)
    assert prefetch.Pacer(2).done(0, 1.0) == 0.0


def test_the_readers_run_idle_and_paced(tmp_path: Path) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, 4 * MIB)
    policies = []

    def observer(offset: int, length: int) -> None:
        policies.append(os.sched_getscheduler(0))

    pacer = prefetch.Pacer(2)
    trace = make_trace(tmp_path, [(i * 2 * CLUSTER, 512) for i in range(6)])
    p = Prefetcher("img", str(origin), trace, depth=2, observer=observer, pacer=pacer, idle=True)
    assert p.start().wait(10) and p.state == "finished"
    assert policies and set(policies) == {os.SCHED_IDLE}
    assert len(pacer.costs) == 6 and pacer.in_flight == 0
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller's thread is left alone


def test_options_start_paced_idle_readers_with_the_cache_map(tmp_path: Path) -> None:
    origin = tmp_path / "origin.raw"
    write_file(origin, MIB)
    d = traces(tmp_path)
    seen = []
    options = PrefetchOptions(d)
    p = options.start(IMAGE, Device("n", str(origin), MIB), lambda: seen.append(1) or [])
    assert p is not None and p.wait(10) and p.state == "finished"
    assert isinstance(p.pacer, prefetch.Pacer) and p.idle and seen == [1]
    q = replace(options, pace=False, idle=False).start(IMAGE, Device("n", str(origin), MIB))
    assert q is not None and q.wait(10) and q.pacer is None and not q.idle
