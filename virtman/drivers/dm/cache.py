"""The node's one cache device, shared by every image (the original's flashcachegroup idea).

Layout of the cache device (``dm_cache_device``, or a loop device over a sparse file)::

    sectors [0, 32768)       16 MiB of headers: slot i = sectors [16 i, 16 i + 16), the
                             8 KiB bcache superblock area of image i's backing device
    sectors [32768, end)     ``vmt_cacheset`` (dm linear): one bcache cache set

Per image the bcache backing device ``cachebk_<image>`` is a dm table of two linear
targets: its header slot, then the read-only ``multipath_<image>``; bcache caches it in the
one cache set (``/dev/bcacheN``), and ``cached_<image>`` is a linear view of that device
with a stable name. bcache was chosen by measurement (docs/dm-driver.rst): it caches a block
on the read that misses it, where dm-cache's smq policy promotes only blocks read again and
re-reads them upstream to do so.

A slot's superblock is written before its backing device exists (bcache-tools' udev rule,
where installed, registers any device with a valid superblock as soon as it appears) and
zeroed when the image is torn down; every backing device gets a new random UUID, so a new
image never sees blocks cached for an old one. Slots in use are read back from the live
``cachebk_`` tables: nothing is kept outside the kernel.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from brick.dm import Linear, SnapshotOrigin, Table
from brick.exception import BrickError, CommandFailed, InvalidArgument
from brick.fileio import FILE_MODE, private_dir
from brick.wait import wait_until
from virtman.drivers.dm import bcache
from virtman.drivers.dm.context import DmContext
from virtman.drivers.dm.names import CACHE_SET, ImageNames, uuid_of
from virtman.errors import adopting
from virtman.layers.base import CacheSpec, Device

LOG = logging.getLogger(__name__)

SLOT_SECTORS = bcache.BDEV_DATA_START  # 16: the backing device's header
HEADER_SECTORS = 32768  # 16 MiB: 2048 slots
SLOTS = HEADER_SECTORS // SLOT_SECTORS
MIN_BUCKETS = 1024  # bcache refuses fewer than 513 ("nbuckets is too small")
CACHE_FILE = "dm-cache.img"


def bucket_sectors_for(sectors: int) -> int:
    """512 KiB buckets, halved (down to 4 KiB) until the device holds 1024 of them."""
    bucket = 1024
    while sectors // bucket < MIN_BUCKETS and bucket > 8:
        bucket //= 2
    if sectors // bucket < MIN_BUCKETS:
        raise InvalidArgument("dm_cache_device", sectors * 512, "too small for a bcache cache")
    return bucket


class CacheSet:
    """The cache device, its header slots and the bcache cache set on the rest of it."""

    def __init__(self, context: DmContext) -> None:
        self.d = context
        self.set_uuid: str | None = None
        self.raw: str | None = None  # the cache device (or its loop device)

    # -- the device ----------------------------------------------------------------------
    @property
    def file(self) -> Path:
        return self.d.settings.cache_dir / CACHE_FILE

    def _loop(self) -> str:
        """The loop device over the cache file: adopted, or made (the file sparse)."""
        found = self.d.loops.find(str(self.file))
        if found:
            return found[0]
        size = self.d.settings.dm_cache_size_mib << 20
        private_dir(self.d.settings.cache_dir)
        if not self.file.exists() or self.file.stat().st_size != size:
            with open(self.file, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                f.truncate(size)
        return self.d.loops.attach(str(self.file))

    def start(self) -> None:
        """Adopt the registered cache set, or make a fresh one (content of an unregistered
        cache device is never trusted: the stacks that used it are gone with the kernel)."""
        configured = self.d.settings.dm_cache_device
        self.raw = configured or self._loop()
        dm = self.d.dm
        sectors = dm.size(self.raw)
        bucket_sectors_for(sectors - HEADER_SECTORS)  # refuse a too small device early
        table = Table.of(
            Linear(length=sectors - HEADER_SECTORS, device=self.raw, offset=HEADER_SECTORS)
        )
        path = dm.create(CACHE_SET, table, uuid=uuid_of("cacheset", "node"))
        kname = self.d.kname(CACHE_SET)
        sysfs = self.d.bcache
        if sysfs.registered(kname):
            sb = bcache.parse_superblock(self.d.host.io.read(path, bcache.SB_OFFSET, 4096))
            if sb is None or sb.backing or not sysfs.set_exists(sb.set_uuid):
                raise BrickError(f"{path} is registered with bcache but not as our cache set")
            self.set_uuid = sb.set_uuid
            LOG.info("adopted bcache cache set %s on %s", self.set_uuid, self.raw)
        else:
            self.set_uuid = str(uuid.uuid4())
            sb = bcache.cache_superblock(
                sectors - HEADER_SECTORS,
                self.set_uuid,
                bucket_sectors=bucket_sectors_for(sectors - HEADER_SECTORS),
            )
            self.d.host.io.write(path, 0, b"\0" * bcache.SB_OFFSET + sb.pack())
            sysfs.register(path)
            set_uuid = self.set_uuid
            wait_until(
                lambda: sysfs.set_exists(set_uuid),
                timeout_s=self.d.timeout_s,
                what=f"bcache cache set {set_uuid}",
            )
            LOG.info(
                "new bcache cache set %s on %s (%d MiB, %d KiB buckets)",
                self.set_uuid,
                self.raw,
                (sectors - HEADER_SECTORS) >> 11,
                sb.bucket_sectors // 2,
            )
        sysfs.tune_set(self.set_uuid)

    def stop(self) -> None:
        """Unregister the cache set and remove its table, if no image uses it any more."""
        if self.backings():
            LOG.info("the cache set stays: images still use it")
            return
        dm, sysfs = self.d.dm, self.d.bcache
        if dm.exists(CACHE_SET):
            kname = self.d.kname(CACHE_SET)
            if sysfs.registered(kname):
                set_uuid = self.set_uuid
                if set_uuid is None:
                    sb = bcache.parse_superblock(
                        self.d.host.io.read(f"/dev/mapper/{CACHE_SET}", bcache.SB_OFFSET, 4096)
                    )
                    set_uuid = sb.set_uuid if sb is not None else None
                if set_uuid is None or not sysfs.set_exists(set_uuid):
                    raise BrickError(f"{CACHE_SET} is registered with bcache, not as our set")
                sysfs.unregister_set(set_uuid)
                wait_until(
                    lambda: not sysfs.registered(kname),
                    timeout_s=self.d.timeout_s,
                    what="the bcache cache set to unregister",
                )
            dm.remove(CACHE_SET)
        if not self.d.settings.dm_cache_device:
            for loop in self.d.loops.find(str(self.file)):
                self.d.loops.detach(loop)
        self.set_uuid = None

    # -- slots ---------------------------------------------------------------------------
    def backings(self) -> dict[str, int]:
        """image -> header slot, for every ``cachebk_`` device of ours."""
        found = {}
        for image in self.d.owned("cachebk"):
            slot = self.slot_of(image)
            if slot is not None:
                found[image] = slot
        return found

    def slot_of(self, image: str) -> int | None:
        """The header slot of the image's backing device, from its live table."""
        try:
            live = self.d.dm.table(ImageNames(image).backing)
        except BrickError:
            return None
        if not live or live[0].type != "linear" or len(live[0].args) != 2:
            return None
        offset = live[0].args[1]
        if not offset.isdigit() or int(offset) % SLOT_SECTORS:
            return None
        return int(offset) // SLOT_SECTORS

    def free_slot(self) -> int:
        used = set(self.backings().values())
        for slot in range(SLOTS):
            if slot not in used:
                return slot
        raise BrickError(f"all {SLOTS} bcache header slots are in use")

    def write_slot(self, slot: int, data: bytes) -> None:
        """Write a slot's 8 KiB header (a superblock, or zeros) on the raw device."""
        assert self.raw is not None
        if not 0 <= slot < SLOTS or len(data) != SLOT_SECTORS * 512:
            raise InvalidArgument("slot", slot, f"must be 0-{SLOTS - 1} with 8 KiB of data")
        self.d.host.io.write(self.raw, slot * SLOT_SECTORS * 512, data)


class BcacheLayer:
    """The cache layer: a bcache backing device per image in the node's one cache set,
    its stable linear view (``cached_<image>``) and the original's ``origin_<image>``."""

    def __init__(self, context: DmContext, cacheset: CacheSet) -> None:
        self.d = context
        self.cacheset = cacheset

    def ensure(self, spec: CacheSpec) -> Device:
        image, upstream = spec.image, spec.upstream
        n = ImageNames(image)
        d, dm, sysfs, cset = self.d, self.d.dm, self.d.bcache, self.cacheset
        if cset.set_uuid is None or cset.raw is None:
            raise BrickError("the bcache cache set is not started")
        sectors = upstream.size // 512
        with d.lock, adopting(image):  # a device of ours with another table: a Conflict
            slot = cset.slot_of(image) if dm.exists(n.backing) else None
            if slot is None:
                slot = cset.free_slot()
                sb = bcache.backing_superblock(str(uuid.uuid4()))
                cset.write_slot(slot, b"\0" * bcache.SB_OFFSET + sb.pack())
            table = Table.of(
                Linear(length=SLOT_SECTORS, device=cset.raw, offset=slot * SLOT_SECTORS),
                Linear(start=SLOT_SECTORS, length=sectors, device=upstream.path),
            )
            backing = dm.create(n.backing, table, uuid=n.uuid("cachebk"))
        kname = d.kname(n.backing)
        if not sysfs.registered(kname):
            sysfs.register(backing)
            wait_until(
                lambda: sysfs.registered(kname),
                timeout_s=d.timeout_s,
                what=f"bcache to register {n.backing}",
            )
        if sysfs.state(kname) == "no cache":
            sysfs.attach(kname, cset.set_uuid)
            wait_until(
                lambda: sysfs.state(kname) != "no cache",
                timeout_s=d.timeout_s,
                what=f"{n.backing} to attach to the cache set",
            )
        sysfs.tune_backing(kname)
        name = wait_until(
            lambda: sysfs.bcache_device(kname),
            timeout_s=d.timeout_s,
            what=f"the bcache device of {n.backing}",
        )
        device = f"/dev/{name}"
        wait_until(
            lambda: d.host.block_device(device), timeout_s=d.timeout_s, what=f"{device} to appear"
        )
        with adopting(image):
            cached = dm.create(
                n.cached, Table.of(Linear(length=sectors, device=device)), uuid=n.uuid("cached")
            )
            dm.create(
                n.origin,
                Table.of(SnapshotOrigin(length=sectors, origin=cached)),
                uuid=n.uuid("origin"),
            )
        return Device(n.cached, cached, sectors * 512)

    def inspect(self, image: str) -> Device | None:
        """The origin (``cached_<image>``) if every device of the cache is ours and the
        backing device is attached to the cache set."""
        n = ImageNames(image)
        for dm_name, kind in ((n.backing, "cachebk"), (n.cached, "cached"), (n.origin, "origin")):
            if not self.d.is_ours(dm_name, kind, image):
                return None
        kname = self.d.kname(n.backing)
        if not self.d.bcache.registered(kname) or self.d.bcache.state(kname) == "no cache":
            return None
        path = n.path(n.cached)
        return Device(n.cached, path, self.d.dm.size(path) * 512)

    def list_owned(self) -> list[str]:
        return sorted({i for kind in ("cachebk", "cached", "origin") for i in self.d.owned(kind)})

    def teardown(self, image: str, *, keep_file: bool = False) -> None:
        n = ImageNames(image)
        d, sysfs = self.d, self.d.bcache
        for name, kind in ((n.origin, "origin"), (n.cached, "cached")):
            d.remove(name, kind, image)
        if not d.is_ours(n.backing, "cachebk", image):
            return
        kname = d.kname(n.backing)
        if sysfs.registered(kname):
            if sysfs.state(kname) != "no cache":
                sysfs.detach(kname)  # drops the image's blocks from the cache set
                wait_until(
                    lambda: not sysfs.registered(kname) or sysfs.state(kname) == "no cache",
                    timeout_s=d.timeout_s,
                    what=f"{n.backing} to detach",
                )
            if sysfs.registered(kname):
                sysfs.stop(kname)
            wait_until(
                lambda: not sysfs.registered(kname),
                timeout_s=d.timeout_s,
                what=f"bcache to release {n.backing}",
            )
        with d.lock:
            slot = self.cacheset.slot_of(image)
            d.remove(n.backing, "cachebk", image)
            if slot is not None and self.cacheset.raw is not None:
                try:
                    self.cacheset.write_slot(slot, b"\0" * (SLOT_SECTORS * 512))
                except (OSError, CommandFailed) as exc:  # a new superblock replaces it anyway
                    LOG.warning("%s: could not zero header slot %d: %s", image, slot, exc)
