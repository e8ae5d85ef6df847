"""Prefetch on a real cluster: a node that builds a new stack for an image with a boot trace
pulls the trace's clusters into its cache by itself, and the VM's reads of them then fetch
nothing from the image server.

Network: every RPC runs in the control namespace; the root namespace only reads the node's
FUSE-exported origin and the VM's overlay (local I/O served by the node's daemon).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from brick.executor import execute
from tests.functional.clusterfixtures import IMAGE, write_image
from virtman.prefetch import CLUSTER, merge, save_trace, trace_path

pytestmark = pytest.mark.functional

SIZE_MIB = 32
SLACK = 48 << 10  # heartbeats, iSCSI NOPs: well under one 64 KiB cluster


def boot_like_reads(size: int, seed: int = 5) -> list[tuple[int, int]]:
    """Reads as a boot makes them: the partition table first (QEMU's open probes sector 0
    too), then scattered, of mixed sizes, some twice."""
    rng = random.Random(seed)
    reads: list[tuple[int, int]] = [(0, 4096)]
    for _ in range(40):
        length = rng.choice([512, 4096, 16384, 65536, 131072, 262144])
        offset = rng.randrange(0, size - length, 512)
        reads.append((offset, length))
        if rng.random() < 0.2 and len(reads) > 3:
            reads.append(rng.choice(reads[:-1]))
    return reads


def cached_ranges(cache_file: Path) -> list[tuple[int, int]]:
    """What the node's qcow2 cache holds itself (no backing in the file)."""
    out = execute(["qemu-img", "map", "-U", "--output=json", str(cache_file)], timeout_s=60)
    return [
        (e["start"], e["length"]) for e in json.loads(out.stdout) if e["data"] and e["depth"] == 0
    ]


def covered(extents: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> bool:
    clusters = {c for o, n in ranges for c in range(o // CLUSTER, -(-(o + n) // CLUSTER))}
    wanted = {c for o, n in extents for c in range(o // CLUSTER, -(-(o + n) // CLUSTER))}
    return wanted <= clusters


def read_through(disk: str, reads: list[tuple[int, int]]) -> str:
    """Read ``reads`` through the VM's disk (qcow2 overlay -> FUSE origin) as a VM with
    ``cache=none`` does: O_DIRECT, so that no kernel readahead reads around them."""
    argv = ["qemu-io", "-r", "-U", "-f", "qcow2", "-t", "none"]
    for offset, length in reads:
        argv += ["-c", f"read {offset} {length}"]
    return execute([*argv, disk], timeout_s=300).stdout


def drop_page_cache(path: Path) -> None:
    """Forget the origin's pages in this kernel, so reads go to the node's stack again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_new_stack_prefetches_the_boot_trace(cluster_factory, tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    cluster = cluster_factory(1, extra_conf=f"prefetch_dir = {traces}\nprefetch_depth = 2\n")
    image_file = cluster.workdir / "image1.raw"
    write_image(image_file, SIZE_MIB)
    size = SIZE_MIB << 20
    reads = boot_like_reads(size)
    save_trace(trace_path(traces, "image1"), reads, size)
    extents = merge(reads, image_size=size)
    prefetched = sum(n for _, n in extents)
    assert cluster.rpc("img", "create_image_target", "image1", str(image_file)).startswith("0:")

    node = cluster.node_dir("n1")
    cache_file = node / "state" / "cache" / f"{IMAGE}.qcow2"
    origin = node / "run" / "exports" / f"{IMAGE}.raw"
    log = node / "virtman.log"
    sent_before = cluster.tx_bytes("img")
    code, _, disk = cluster.rpc(
        "n1", "create", "vm1", "image1", cluster.connection(IMAGE)
    ).partition(":")
    assert code == "0", disk

    # Nobody reads the disk, yet the trace's clusters arrive in the cache.
    cluster.wait_for(lambda: "prefetch finished" in log.read_text(), "the prefetch to finish")
    assert f"{IMAGE}: prefetch started: {len(extents)} extents, {prefetched} bytes" in (
        log.read_text()
    )
    cluster.wait_for(
        lambda: covered(extents, cached_ranges(cache_file)), "the cache to hold the trace"
    )
    held = sum(n for _, n in cached_ranges(cache_file))
    assert prefetched <= held <= prefetched + 4 * CLUSTER, (held, prefetched)
    sent_for_prefetch = cluster.tx_bytes("img") - sent_before
    assert sent_for_prefetch >= prefetched, (sent_for_prefetch, prefetched)
    # never twice: the trace's clusters once, plus iSCSI's framing (well under 5 %)
    assert sent_for_prefetch <= prefetched * 1.05 + SLACK, (sent_for_prefetch, prefetched)

    # The VM's reads of them come from the cache: the image server sends nothing more.
    drop_page_cache(origin)
    sent_before = cluster.tx_bytes("img")
    out = read_through(disk, reads)
    assert out.count("read ") == len(reads), out
    with open(origin, "rb") as got, open(image_file, "rb") as want:
        os.posix_fadvise(got.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around
        for offset, length in reads:
            assert os.pread(got.fileno(), length, offset) == os.pread(
                want.fileno(), length, offset
            ), f"the VM's disk differs from the image at {offset}"
    sent = cluster.tx_bytes("img") - sent_before
    assert sent <= SLACK, f"the image server sent {sent} bytes for prefetched reads"
    assert sum(n for _, n in cached_ranges(cache_file)) == held  # nothing new was cached

    # A cluster the trace never touched still comes from upstream (the measure works).
    touched = {c for o, n in extents for c in range(o // CLUSTER, -(-(o + n) // CLUSTER))}
    cold = next(c for c in range(size // CLUSTER) if c not in touched)
    sent_before = cluster.tx_bytes("img")
    read_through(disk, [(cold * CLUSTER, CLUSTER)])
    assert cluster.tx_bytes("img") - sent_before >= CLUSTER
    print(
        f"\nprefetched {len(extents)} extents, {prefetched} bytes; "
        f"the VM's reads of them fetched {sent} bytes from the image server"
    )


def test_destroy_stops_a_slow_prefetch_and_removes_the_stack(
    cluster_factory, tmp_path: Path
) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    cluster = cluster_factory(1, extra_conf=f"prefetch_dir = {traces}\nprefetch_pause_ms = 500\n")
    image_file = cluster.workdir / "image1.raw"
    write_image(image_file, 8)
    size = 8 << 20
    save_trace(trace_path(traces, "image1"), [(i * 2 * CLUSTER, 4096) for i in range(64)], size)
    assert cluster.rpc("img", "create_image_target", "image1", str(image_file)).startswith("0:")
    node = cluster.node_dir("n1")
    log = node / "virtman.log"
    result = cluster.rpc("n1", "create", "vm1", "image1", cluster.connection(IMAGE))
    assert result.startswith("0:"), result
    cluster.wait_for(lambda: "prefetch started" in log.read_text(), "the prefetch to start")
    assert cluster.rpc("n1", "destroy", "vm1") == "0:"
    cluster.wait_for(lambda: f"{IMAGE}: torn down" in log.read_text(), "the stack to go", 30)
    assert not list((node / "state" / "cache").iterdir())
    text = log.read_text()
    assert f"{IMAGE}: prefetch stopped after" in text, text
    assert text.index("prefetch stopped after") < text.index(f"{IMAGE}: torn down")
    assert "Traceback" not in text


def test_the_prefetch_skips_what_the_vm_fetched_first(cluster_factory, tmp_path: Path) -> None:
    """The VM reads the second half of the trace while the (slowed) prefetch is still on
    the first: the prefetch finds those clusters in the cache's map and does not read
    them; the image server sends every cluster once."""
    traces = tmp_path / "traces"
    traces.mkdir()
    cluster = cluster_factory(1, extra_conf=f"prefetch_dir = {traces}\nprefetch_pause_ms = 400\n")
    image_file = cluster.workdir / "image1.raw"
    write_image(image_file, 8)
    size = 8 << 20
    extents = [(i * 2 * CLUSTER, CLUSTER) for i in range(16)]
    save_trace(trace_path(traces, "image1"), extents, size)
    assert cluster.rpc("img", "create_image_target", "image1", str(image_file)).startswith("0:")
    node = cluster.node_dir("n1")
    log = node / "virtman.log"
    sent_before = cluster.tx_bytes("img")
    code, _, disk = cluster.rpc(
        "n1", "create", "vm1", "image1", cluster.connection(IMAGE)
    ).partition(":")
    assert code == "0", disk
    cluster.wait_for(lambda: "prefetch started" in log.read_text(), "the prefetch to start")
    read_through(disk, extents[8:])  # the VM, ahead of the prefetch (2 reads/0.8 s)
    cluster.wait_for(lambda: "prefetch finished" in log.read_text(), "the prefetch", 60)
    text = log.read_text()
    line = next(x for x in text.splitlines() if "prefetch finished" in x)
    skipped = int(line.split("(")[1].split(" bytes cached already")[0])
    assert skipped >= 4 * CLUSTER, line  # the later clusters were in the cache's map
    sent = cluster.tx_bytes("img") - sent_before
    assert 16 * CLUSTER <= sent <= 16 * CLUSTER * 1.05 + SLACK, sent
    print(f"\nthe prefetch skipped {skipped} bytes; the image server sent {sent} bytes")
