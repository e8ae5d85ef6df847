"""Measure what a kernel cache engine fetches upstream on a first and a later read.

``python bench/cache_engines.py --size-mib 32 --json out.json`` (root, a Linux
kernel with device-mapper and bcache): for each engine, a fresh cache over a counting
upstream, then the same reads several times; the upstream's read counter
(``/sys/block/dm-N/stat``, sectors read) gives the bytes each pass fetched. The upstream is
a read-only loop device of random bytes under a read-only dm ``linear`` (like the image's
read-only multipath device); reads use ``O_DIRECT`` so the page cache never answers.

Engines: dm-cache ``smq`` (default and tuned), dm-cache ``mq`` with its old promotion
arguments (an alias of smq since Linux 4.x), bcache (writethrough, ``sequential_cutoff`` 0,
congestion bypass off), dm-writecache (a write cache: reads are expected to go upstream),
dm-clone (if the kernel has it). The figures chose the ``dm`` driver's engine
(docs/dm-driver.rst); ``tests/functional/test_dm_guests.py`` runs this in a guest (the file
is copied into the guest's payload; the project's packages are on the guest's path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from brick.exception import CommandFailed
from brick.executor import execute
from brick.wait import wait_until
from virtman.drivers.dm import bcache

MIB = 1 << 20
PREFIX = "vmtm_"


@dataclass
class Pass:
    upstream_bytes: int
    read_bytes: int
    seconds: float


@dataclass
class Measurement:
    engine: str
    pattern: str
    passes: list[Pass] = field(default_factory=list)
    status: str = ""  # the engine's own counters after the last pass
    error: str = ""


def sh(*argv: str, stdin: str | None = None) -> str:
    return execute(list(argv), stdin=stdin).stdout


def dm_create(name: str, table: str, *, readonly: bool = False) -> str:
    sh("dmsetup", "create", name, *(["--readonly"] if readonly else []), stdin=table)
    path = f"/dev/mapper/{name}"
    wait_until(lambda: os.path.exists(path), timeout_s=10, what=path)
    return path


def sectors_read(device: str) -> int:
    """Sectors read so far from a block device (field 3 of its sysfs stat)."""
    name = os.path.basename(os.path.realpath(device))
    return int(Path(f"/sys/block/{name}/stat").read_text().split()[2])


def sysfs_dir(device: str) -> Path:
    return Path("/sys/block") / os.path.basename(os.path.realpath(device))


def read_range(path: str, offsets: list[int], size: int) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    total = 0
    try:
        for offset in offsets:
            total += os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return total


@contextlib.contextmanager
def loop(path: Path, mib: int, *, data: bool = False, readonly: bool = False) -> Iterator[str]:
    with open(path, "wb") as f:
        if data:
            for _ in range(mib):
                f.write(os.urandom(MIB))
        else:
            f.truncate(mib * MIB)
    device = sh("losetup", "-f", "--show", *(["-r"] if readonly else []), str(path)).strip()
    try:
        yield device
    finally:
        sh("losetup", "-d", device)
        path.unlink()


def remove(name: str) -> None:
    wait_until(
        lambda: execute(["dmsetup", "remove", name], check_exit_code=False).exit_code == 0,
        timeout_s=20,
        what=f"dmsetup remove {name}",
    )


@contextlib.contextmanager
def dm(name: str, table: str, *, readonly: bool = False) -> Iterator[str]:
    path = dm_create(name, table, readonly=readonly)
    try:
        yield path
    finally:
        remove(name)


Made = tuple[str, Callable[[], str]]  # the cached device, and its status line
Engine = Callable[[str, int, Path], contextlib.AbstractContextManager[Made]]


def dm_cache(block: int, policy: str = "smq", args: tuple[str, ...] = ()) -> Engine:
    @contextlib.contextmanager
    def make(up: str, sectors: int, scratch: Path) -> Iterator[tuple[str, Callable[[], str]]]:
        cache_mib = sectors * 512 // MIB + 8
        with (
            loop(scratch / "meta", 8) as meta,
            loop(scratch / "data", cache_mib) as data,
        ):
            policy_args = f"{policy} {len(args)} {' '.join(args)}".strip()
            table = f"0 {sectors} cache {meta} {data} {up} {block} 1 writethrough {policy_args}\n"
            with dm(PREFIX + "cache", table) as dev:
                yield dev, lambda: sh("dmsetup", "status", PREFIX + "cache").strip()

    return make


def bcache_engine(bucket_sectors: int, cache_mib: int) -> Engine:
    """One cache set on a (sparse) loop device; the backing device = 8 KiB local header +
    upstream."""

    @contextlib.contextmanager
    def make(up: str, sectors: int, scratch: Path) -> Iterator[Made]:
        execute(["modprobe", "bcache"])
        set_uuid = str(uuid.uuid4())
        with loop(scratch / "cset", cache_mib) as cdev, loop(scratch / "hdr", 1) as hdr:
            sb = bcache.cache_superblock(cache_mib * 2048, set_uuid, bucket_sectors=bucket_sectors)
            bcache.write_superblock(cdev, sb)
            Path("/sys/fs/bcache/register").write_text(cdev)
            cset = Path("/sys/fs/bcache") / set_uuid
            wait_until(cset.exists, timeout_s=10, what="the cache set")
            table = f"0 16 linear {hdr} 0\n16 {sectors} linear {up} 0\n"
            try:
                with dm(PREFIX + "bk", table) as bk:
                    bcache.write_superblock(bk, bcache.backing_superblock(str(uuid.uuid4())))
                    Path("/sys/fs/bcache/register").write_text(bk)
                    ctl = sysfs_dir(bk) / "bcache"
                    wait_until(ctl.exists, timeout_s=10, what="the backing device")
                    (ctl / "attach").write_text(set_uuid)
                    (ctl / "sequential_cutoff").write_text("0")
                    (cset / "congested_read_threshold_us").write_text("0")
                    (cset / "congested_write_threshold_us").write_text("0")
                    dev = "/dev/" + (ctl / "dev").resolve().name
                    wait_until(lambda: os.path.exists(dev), timeout_s=10, what=dev)
                    state = (ctl / "state").read_text().strip()

                    def status() -> str:
                        time.sleep(6)  # bcache folds its counters in every 5 s
                        keys = (
                            "cache_hits",
                            "cache_misses",
                            "cache_bypass_hits",
                            "cache_bypass_misses",
                            "cache_miss_collisions",
                        )
                        stats = ctl / "stats_total"
                        values = {k: (stats / k).read_text().strip() for k in keys}
                        used = (cset / "cache_available_percent").read_text().strip()
                        return f"state {state}; available {used}%; " + " ".join(
                            f"{k} {v}" for k, v in values.items()
                        )

                    try:
                        yield dev, status
                    finally:
                        (ctl / "stop").write_text("1")
                        wait_until(lambda: not ctl.exists(), timeout_s=20, what="bcache stop")
            finally:
                (cset / "unregister").write_text("1")
                wait_until(lambda: not cset.exists(), timeout_s=20, what="cache set unregister")

    return make


@contextlib.contextmanager
def writecache_engine(
    up: str, sectors: int, scratch: Path
) -> Iterator[tuple[str, Callable[[], str]]]:
    with loop(scratch / "wc", sectors * 512 // MIB + 8) as cdev:
        table = f"0 {sectors} writecache s {up} {cdev} 4096 0\n"
        with dm(PREFIX + "wc", table) as dev:
            yield dev, lambda: sh("dmsetup", "status", PREFIX + "wc").strip()


@contextlib.contextmanager
def clone_engine(up: str, sectors: int, scratch: Path) -> Iterator[tuple[str, Callable[[], str]]]:
    execute(["modprobe", "dm-clone"])
    with loop(scratch / "cm", 8) as meta, loop(scratch / "cd", sectors * 512 // MIB + 1) as dest:
        table = f"0 {sectors} clone {meta} {dest} {up} 8 1 no_hydration\n"
        with dm(PREFIX + "clone", table) as dev:
            yield dev, lambda: sh("dmsetup", "status", PREFIX + "clone").strip()


ENGINES: dict[str, Engine] = {
    "dm-cache smq, 256 KiB blocks (default)": dm_cache(512),
    "dm-cache smq, 32 KiB blocks": dm_cache(64),
    "dm-cache smq, 32 KiB blocks, migration_threshold 2^24": dm_cache(
        64, args=("migration_threshold", str(1 << 24))
    ),
    "dm-cache mq (smq alias), read_promote_adjustment 0": dm_cache(
        64,
        "mq",
        ("migration_threshold", str(1 << 24), "read_promote_adjustment", "0"),
    ),
    "bcache writethrough, sequential_cutoff 0, 1 GiB cache": bcache_engine(1024, 1024),
    "bcache writethrough, sequential_cutoff 0, 64 GiB cache": bcache_engine(1024, 65536),
    "dm-writecache": writecache_engine,
    "dm-clone (no background hydration)": clone_engine,
}


def patterns(size: int, seed: int = 7) -> dict[str, tuple[list[int], int]]:
    """Offsets and read size: the whole device in 1 MiB reads, and 2048 random 4 KiB reads."""
    rng = random.Random(seed)
    blocks = size // 4096
    return {
        "sequential 1 MiB": ([o * MIB for o in range(size // MIB)], MIB),
        "random 4 KiB": ([rng.randrange(blocks) * 4096 for _ in range(2048)], 4096),
    }


def measure(
    name: str, engine: Engine, size_mib: int, passes: int, scratch: Path, pause_s: float = 0.0
) -> list[Measurement]:
    results = []
    with loop(scratch / "image", size_mib, data=True, readonly=True) as image:
        sectors = size_mib * 2048
        with dm(PREFIX + "up", f"0 {sectors} linear {image} 0\n", readonly=True) as up:
            for pattern, (offsets, size) in patterns(size_mib * MIB).items():
                m = Measurement(name, pattern)
                results.append(m)
                try:
                    with engine(up, sectors, scratch) as (dev, status):
                        for n in range(passes):
                            if n and pause_s:
                                time.sleep(pause_s)  # smq promotes in the background
                            before, t0 = sectors_read(up), time.monotonic()
                            got = read_range(dev, offsets, size)
                            m.passes.append(
                                Pass(
                                    (sectors_read(up) - before) * 512,
                                    got,
                                    round(time.monotonic() - t0, 2),
                                )
                            )
                        m.status = status()
                except (CommandFailed, OSError) as exc:
                    m.error = f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, CommandFailed):
                        m.error += f" ({exc.stderr.strip()[-200:]})"
                print(json.dumps(m, default=lambda o: o.__dict__), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--pause-s", type=float, default=0.0, help="between passes")
    parser.add_argument("--scratch", default="/run/vmt-measure")
    parser.add_argument("--engine", action="append", help="substring of an engine name")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    for module in ("dm-mod", "dm-cache", "dm-cache-smq", "dm-writecache", "loop"):
        execute(["modprobe", module])
    chosen = {
        n: e for n, e in ENGINES.items() if not args.engine or any(s in n for s in args.engine)
    }
    results = []
    for name, engine in chosen.items():
        results += measure(name, engine, args.size_mib, args.passes, scratch, args.pause_s)
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=lambda o: o.__dict__, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
