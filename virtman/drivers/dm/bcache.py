"""bcache on-disk superblocks and the kernel's sysfs interface, without bcache-tools.

The ``dm`` driver's cache engine (see docs/dm-driver.rst for the measurement that chose it):
one bcache *cache set* on the node's cache device serves every image, and each image is a
bcache *backing device* attached to it. A backing device needs a superblock in its first
8 KiB; an image's upstream (the read-only multipath) cannot take one, so the backing device
is a dm ``linear`` concatenation of a local 8 KiB header slice and the multipath device.

``make-bcache`` (bcache-tools) is not needed: ``superblock`` writes the same bytes
(``bcache-super-show`` accepts them, and the kernel registers them), and avoids
bcache-tools' udev rule, which registers every device with a superblock as soon as it
appears and would race the driver.

Layout of ``struct cache_sb_disk`` (include/uapi/linux/bcache.h), little endian, at byte
4096 (sector 8); the checksum is bcache's crc64 (ECMA-182, MSB first, inverted) of bytes
8..208, plus the journal bucket list the kernel adds once the cache set runs.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import brick.privileged.sysfs

SB_SECTOR = 8
SB_OFFSET = SB_SECTOR * 512
SB_SIZE = 4096
BDEV_DATA_START = 16  # sectors: the 8 KiB header a backing device starts with
MAGIC = bytes.fromhex("c68573f64e1a45ca8265f57f48ba6d81")
VERSION_CDEV = 0
VERSION_BDEV = 1
VERSION_CDEV_WITH_UUID = 3  # the kernel rewrites a running cache set's superblock so
VERSION_BDEV_WITH_OFFSET = 4
VERSIONS_CDEV = (VERSION_CDEV, VERSION_CDEV_WITH_UUID)
VERSIONS_BDEV = (VERSION_BDEV, VERSION_BDEV_WITH_OFFSET)
_POLY = 0x42F0E1EBA9EA3693
_MASK = (1 << 64) - 1
_HEAD = struct.Struct("<QQQ16s16s16s32sQQQQQ40sQHHHHIHH")  # up to d[] (208 bytes)


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 56
        for _ in range(8):
            crc = ((crc << 1) ^ _POLY) & _MASK if crc & (1 << 63) else (crc << 1) & _MASK
        table.append(crc)
    return table


_TABLE = _table()


def crc64(data: bytes) -> int:
    """bcache's ``bch_crc64``: CRC-64/ECMA-182 MSB first, init and final xor all ones."""
    crc = _MASK
    for byte in data:
        crc = _TABLE[((crc >> 56) ^ byte) & 0xFF] ^ ((crc << 8) & _MASK)
    return crc ^ _MASK


@dataclass(frozen=True)
class Superblock:
    """The fields of a bcache superblock this driver writes and checks."""

    backing: bool  # a backing device (else a cache device)
    uuid: str
    set_uuid: str
    block_sectors: int = 1
    bucket_sectors: int = 1024
    nbuckets: int = 0  # cache devices
    first_bucket: int = 1  # cache devices
    data_offset: int = BDEV_DATA_START  # backing devices
    label: str = ""

    def pack(self) -> bytes:
        """The 4096 bytes to write at byte 4096 of the device."""
        if self.block_sectors & (self.block_sectors - 1) or not 1 <= self.block_sectors <= 8:
            raise ValueError("block_sectors must be a power of two 1-8")
        if self.bucket_sectors & (self.bucket_sectors - 1) or self.bucket_sectors < 8:
            raise ValueError("bucket_sectors must be a power of two >= 8")
        if self.backing and self.data_offset != BDEV_DATA_START:
            raise ValueError("only the default data offset (16 sectors) is written")
        if not self.backing and self.nbuckets < 128:
            raise ValueError("a cache device needs at least 128 buckets")
        label = self.label.encode()
        if len(label) > 32:
            raise ValueError("label longer than 32 bytes")
        # version 1 (no offset field) means data at sector 16; the union stays 0
        nbuckets = 0 if self.backing else self.nbuckets
        head = _HEAD.pack(
            0,
            SB_SECTOR,
            VERSION_BDEV if self.backing else VERSION_CDEV,
            MAGIC,
            uuidlib.UUID(self.uuid).bytes,
            uuidlib.UUID(self.set_uuid).bytes,
            label.ljust(32, b"\0"),
            0,  # flags: writethrough (backing), lru and no discard (cache)
            0,  # seq
            0,
            0,
            0,  # feature_compat, _incompat, _ro_compat
            b"\0" * 40,  # pad[5]
            nbuckets,
            self.block_sectors,
            self.bucket_sectors,
            0 if self.backing else 1,  # nr_in_set
            0,  # nr_this_dev
            0,  # last_mount
            0 if self.backing else self.first_bucket,
            0,  # keys / njournal_buckets
        )
        csum = crc64(head[8:])
        return (struct.pack("<Q", csum) + head[8:]).ljust(SB_SIZE, b"\0")


def cache_superblock(
    sectors: int, set_uuid: str, *, bucket_sectors: int = 1024, block_sectors: int = 1
) -> Superblock:
    """A cache device's superblock for a device of ``sectors`` (as make-bcache -C)."""
    return Superblock(
        backing=False,
        uuid=str(uuidlib.uuid4()),
        set_uuid=set_uuid,
        block_sectors=block_sectors,
        bucket_sectors=bucket_sectors,
        nbuckets=sectors // bucket_sectors,
        first_bucket=23 // bucket_sectors + 1,
    )


def backing_superblock(uuid: str, *, label: str = "", block_sectors: int = 1) -> Superblock:
    """A detached writethrough backing device's superblock (as make-bcache -B)."""
    return Superblock(
        backing=True,
        uuid=uuid,
        set_uuid=str(uuidlib.uuid4()),
        block_sectors=block_sectors,
        label=label,
    )


def parse_superblock(data: bytes) -> Superblock | None:
    """The superblock in the 4096 bytes read at byte 4096, or None if there is none (bad
    magic, offset or checksum)."""
    if len(data) < _HEAD.size:
        return None
    fields = _HEAD.unpack(data[: _HEAD.size])
    csum, offset, version, magic, uuid, set_uuid, label = fields[:7]
    keys = fields[-1]  # the kernel lists its journal buckets after the header
    end = _HEAD.size + 8 * keys
    if magic != MAGIC or offset != SB_SECTOR or len(data) < end or csum != crc64(data[8:end]):
        return None
    if version not in (*VERSIONS_CDEV, *VERSIONS_BDEV):
        return None
    nbuckets, block, bucket, _nr_in_set, _nr_this, _mount, first, _keys = fields[13:]
    backing = version in VERSIONS_BDEV
    return Superblock(
        backing=backing,
        uuid=str(uuidlib.UUID(bytes=uuid)),
        set_uuid=str(uuidlib.UUID(bytes=set_uuid)),
        block_sectors=block,
        bucket_sectors=bucket,
        nbuckets=0 if backing else nbuckets,
        first_bucket=0 if backing else first,
        data_offset=nbuckets if version == VERSION_BDEV_WITH_OFFSET else BDEV_DATA_START,
        label=label.rstrip(b"\0").decode(errors="replace"),
    )


def write_superblock(path: str, sb: Superblock) -> None:
    """Zero the device's first 4 KiB and write ``sb`` at 4 KiB (O_DIRECT-free, fsynced)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * SB_OFFSET, 0)
        os.pwrite(fd, sb.pack(), SB_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_superblock(path: str) -> Superblock | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return parse_superblock(os.pread(fd, SB_SIZE, SB_OFFSET))
    finally:
        os.close(fd)


# -- the kernel's interface (sysfs) ------------------------------------------------------------
class DiskIO:
    """Reads and writes of a few bytes at an offset of a block device (tests pass a fake)."""

    def read(self, path: str, offset: int, size: int) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def write(self, path: str, offset: int, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.pwrite(fd, data, offset) != len(data):
                raise OSError(f"short write to {path}")
            os.fsync(fd)
        finally:
            os.close(fd)


class BcacheSysfs:
    """bcache's sysfs files under ``root`` (``/sys``); devices are kernel names (``dm-3``).

    Registration goes through ``register_quiet`` so that a device that bcache-tools' udev
    rule registered first is not an error. Every write goes through ``write`` (default: the
    privileged entry point ``brick.privileged.sysfs.write_knob``, whose allow-list names each
    bcache knob written here); reads are plain (sysfs is world-readable).
    """

    def __init__(
        self,
        root: Path | str = "/sys",
        write: Callable[[str, str], None] = brick.privileged.sysfs.write_knob,
    ) -> None:
        self.root = Path(root)
        self.write = write

    def _ctl(self, kname: str) -> Path:
        return self.root / "block" / kname / "bcache"

    def _write(self, path: Path, value: str) -> None:
        self.write(str(path), value)

    def register(self, device: str) -> None:
        self._write(self.root / "fs" / "bcache" / "register_quiet", device)

    def registered(self, kname: str) -> bool:
        """Whether bcache holds the device (as a backing or a cache device)."""
        return self._ctl(kname).is_dir()

    def set_exists(self, set_uuid: str) -> bool:
        return (self.root / "fs" / "bcache" / set_uuid).is_dir()

    def state(self, kname: str) -> str:
        """A backing device's state: ``no cache``, ``clean``, ``dirty``, ``inconsistent``."""
        return (self._ctl(kname) / "state").read_text().strip()

    def attach(self, kname: str, set_uuid: str) -> None:
        self._write(self._ctl(kname) / "attach", set_uuid)

    def detach(self, kname: str) -> None:
        self._write(self._ctl(kname) / "detach", "1")

    def stop(self, kname: str) -> None:
        self._write(self._ctl(kname) / "stop", "1")

    def bcache_device(self, kname: str) -> str | None:
        """The ``bcacheN`` a registered backing device shows as."""
        link = self._ctl(kname) / "dev"
        return link.resolve().name if link.exists() else None

    def tune_backing(self, kname: str) -> None:
        """Cache every read, sequential ones too (bcache skips them by default)."""
        self._write(self._ctl(kname) / "sequential_cutoff", "0")

    def tune_set(self, set_uuid: str) -> None:
        """Never bypass the cache because the cache device looks congested."""
        base = self.root / "fs" / "bcache" / set_uuid
        for name in ("congested_read_threshold_us", "congested_write_threshold_us"):
            self._write(base / name, "0")

    def unregister_set(self, set_uuid: str) -> None:
        self._write(self.root / "fs" / "bcache" / set_uuid / "unregister", "1")
