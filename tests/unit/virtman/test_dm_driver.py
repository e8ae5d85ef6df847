"""The dm driver against a simulated kernel: every command goes through a fake ``execute``
(dmsetup, blockdev, losetup, iscsiadm), bcache's sysfs and the disk writes through fakes,
LIO through the fake rtslib of the brick tests. The fake keeps the state a kernel would
(devices, holders, sessions, loops, bcache registrations), so the tests check the exact
tables and argv of a build, and that a teardown or an undo leaves nothing."""

from __future__ import annotations

import json
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from brick.exception import CommandFailed, PathsUnavailable
from brick.executor import Result
from brick.qsd.daemon import Export
from tests.unit.fakes.rtslib import fake_rtslib
from tests.unit.fakes.volt import FakeVolt, ready
from virtman.compute import Virtman
from virtman.conf import Settings
from virtman.drivers.dm import bcache
from virtman.drivers.dm.cache import HEADER_SECTORS, bucket_sectors_for
from virtman.drivers.dm.driver import DmDriver, FailoverMultipath, Host
from virtman.errors import Conflict
from virtman.layers.base import Device, Endpoint, SnapshotSpec, UpstreamSpec

IMAGE = "volume-img"
IQN = f"iqn.2010-10.org.openstack:{IMAGE}"
SERVER = "10.0.0.1:3260"
SIZE = 65536  # sectors (32 MiB)
RAW = "/dev/vdb"
RAW_SECTORS = 64 << 21  # 64 GiB
CONNECTION = {"target_portal": SERVER, "target_iqn": IQN, "target_lun": 1}


def fail(argv: Sequence[str], stderr: str, rc: int = 1) -> CommandFailed:
    return CommandFailed(list(argv), rc, stderr)


@dataclass
class Dev:
    uuid: str
    minor: int
    lines: list[str]  # as dmsetup table prints them (devices as major:minor)
    readonly: bool
    inactive: list[str] | None = None
    paths: dict[str, bool] = field(default_factory=dict)  # multipath: devno -> active
    group: int = 1


class FakeKernel:
    """dmsetup, blockdev, losetup, iscsiadm and the sysfs/by-path files they leave."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sysfs = tmp / "sys"
        self.by_path = tmp / "by-path"
        self.by_path.mkdir()
        self.calls: list[tuple[list[str], str | None]] = []
        self.devs: dict[str, Dev] = {}
        self.blk: dict[str, tuple[str, int, bool]] = {RAW: ("252:16", RAW_SECTORS, False)}
        self.minor = 0
        self.loops: dict[str, str] = {}
        self.loopn = 0
        self.targets: dict[tuple[str, str], int] = {(SERVER, IQN): SIZE}
        self.records: set[tuple[str, str]] = set()
        self.sessions: dict[int, tuple[str, str, str]] = {}  # sid -> portal, iqn, disk
        self.links: dict[str, str] = {}  # by-path file -> /dev/sdX
        self.sid = 0
        self.disk = 0
        self.fail_on: list[tuple[str, ...]] = []
        self.messages: list[tuple[str, ...]] = []
        self.opened: set[str] = set()  # block devices a process (qemu-storage-daemon) holds

    # -- seams ---------------------------------------------------------------------------
    def devno(self, device: str) -> str:
        if ":" in device and device.split(":")[0].isdigit():
            return device
        return self.blk[device][0]

    def block_device(self, device: str) -> bool:
        return device in self.blk or ":" in device

    def realpath(self, path: str) -> str:
        return self.links.get(path, path)

    def argvs(self, tool: str | None = None) -> list[list[str]]:
        return [a for a, _ in self.calls if tool is None or a[0] == tool]

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check_exit_code: bool | Sequence[int] = True,
        timeout_s: float = 60.0,
        stdin: str | None = None,
    ) -> Result:
        argv = list(argv)
        self.calls.append((argv, stdin))
        try:
            for prefix in self.fail_on:
                if tuple(argv[: len(prefix)]) == prefix:
                    raise fail(argv, "injected failure")
            out = getattr(self, "_" + argv[0].replace("-", "_"))(argv[1:], stdin)
            result = Result(out, "", 0)
        except CommandFailed as exc:
            result = Result("", exc.stderr, exc.exit_code)
        allowed = (0,) if check_exit_code is True else check_exit_code or ()
        if check_exit_code is not False and result.exit_code not in allowed:
            raise CommandFailed(argv, result.exit_code, result.stderr)
        return result

    # -- tools -----------------------------------------------------------------------------
    def _modprobe(self, args: list[str], stdin: str | None) -> str:
        return ""

    def _udevadm(self, args: list[str], stdin: str | None) -> str:
        return ""

    def _blockdev(self, args: list[str], stdin: str | None) -> str:
        if args[0] == "--flushbufs":
            return ""
        _, size, ro = self.blk[args[1]]
        return f"{size}\n" if args[0] == "--getsz" else f"{int(ro)}\n"

    def _losetup(self, args: list[str], stdin: str | None) -> str:
        if args[0] == "--list":
            return "".join(f"{dev} {file}\n" for dev, file in sorted(self.loops.items()))
        if args[0] == "--find":
            dev = f"/dev/loop{self.loopn}"
            self.loopn += 1
            self.loops[dev] = args[2]
            self.blk[dev] = (f"7:{len(self.blk)}", Path(args[2]).stat().st_size // 512, False)
            return dev + "\n"
        if args[0] == "--detach":
            if args[1] not in self.loops:
                raise fail(args, "losetup: No such device or address")
            if self._held(args[1]):
                raise fail(args, "losetup: device is busy")
            del self.loops[args[1]]
            del self.blk[args[1]]
            return ""
        raise AssertionError(args)

    def _held(self, device: str) -> bool:
        devno = self.blk[device][0]
        held = any(devno in " ".join(d.lines).split() for d in self.devs.values())
        return held or device in self.opened

    def _table(self, text: str) -> list[str]:
        lines = []
        for line in text.strip().splitlines():
            words = line.split()
            for i, word in enumerate(words):
                if word.startswith("/dev/"):
                    if word not in self.blk:
                        raise fail(["dmsetup"], f"device-mapper: {word}: No such device")
                    words[i] = self.blk[word][0]
            lines.append(" ".join(words))
        return lines

    def _dmsetup(self, args: list[str], stdin: str | None) -> str:
        verb = args[0]
        if verb == "info":
            if len(args) > 7:
                if args[7] not in self.devs:
                    raise fail(args, "Device does not exist.\nCommand failed.\n")
                return self._info(args[7])
            return "".join(self._info(name) for name in sorted(self.devs))
        if verb == "ls":
            return (
                "".join(f"{n}\t(253:{d.minor})\n" for n, d in sorted(self.devs.items()))
                or "No devices found\n"
            )
        name = args[1] if verb in ("create", "message") else args[-1]
        if verb == "create":
            if name in self.devs:
                raise fail(args, "device-mapper: create ioctl failed: Device or resource busy")
            lines = self._table(stdin or "")
            uuid = args[args.index("--uuid") + 1] if "--uuid" in args else ""
            self.minor += 1
            dev = Dev(uuid, self.minor, lines, "--readonly" in args)
            if lines[0].split()[2] == "multipath":
                dev.paths = {w: True for w in lines[0].split() if ":" in w and w[0].isdigit()}
            self.devs[name] = dev
            size = sum(int(line.split()[1]) for line in lines)
            self.blk[f"/dev/mapper/{name}"] = (f"253:{self.minor}", size, dev.readonly)
            return ""
        if name not in self.devs:
            raise fail(args, "Device does not exist.\nCommand failed.\n")
        dev = self.devs[name]
        if verb == "table":
            return "".join(line + " \n" for line in dev.lines)
        if verb == "status":
            return "".join(self._status(dev, line) + "\n" for line in dev.lines)
        if verb == "reload":
            dev.inactive = self._table(stdin or "")
            return ""
        if verb in ("suspend", "clear"):
            return ""
        if verb == "resume":
            if dev.inactive is not None:
                dev.lines, dev.inactive = dev.inactive, None
                if dev.lines[0].split()[2] == "multipath":
                    words = dev.lines[0].split()
                    dev.paths = {w: dev.paths.get(w, True) for w in words if _devno(w)}
                    dev.group = 1
            return ""
        if verb == "remove":
            if self._held(f"/dev/mapper/{name}"):
                raise fail(args, "device-mapper: remove ioctl failed: Device or resource busy")
            del self.devs[name]
            del self.blk[f"/dev/mapper/{name}"]
            return ""
        if verb == "message":
            self.messages.append((args[1], *args[3:]))
            if args[3] == "reinstate_path":
                dev.paths[args[4]] = True
            if args[3] == "switch_group":
                dev.group = int(args[4])
            return ""
        raise AssertionError(args)

    def _info(self, name: str) -> str:
        d = self.devs[name]
        attr = "L-" + "-" + ("r" if d.readonly else "w")
        return f"{name}|{d.uuid}|253|{d.minor}|0|{attr}|{len(d.lines)}\n"

    def _status(self, dev: Dev, line: str) -> str:
        words = line.split()
        if words[2] != "multipath":
            return " ".join(words[:3])
        paths = [w for w in words if _devno(w)]
        groups = " ".join(
            f"{'A' if i + 1 == dev.group else 'E'} 0 1 0 {p} {'A' if dev.paths[p] else 'F'} 0"
            for i, p in enumerate(paths)
        )
        return f"{words[0]} {words[1]} multipath 2 0 0 0 {len(paths)} {dev.group} {groups}"

    def _xargs(self, args: list[str], stdin: str | None) -> str:
        return ""  # the CHAP password update

    def _tee(self, args: list[str], stdin: str | None) -> str:
        delete = Path(args[1])
        disk = delete.parent.parent.name
        for sid, (_portal, _iqn, d) in list(self.sessions.items()):
            if d == disk:
                self._drop_disk(sid)
        return ""

    def _drop_disk(self, sid: int) -> None:
        portal, iqn, disk = self.sessions[sid]
        if not disk:
            return
        link = next(k for k, v in self.links.items() if v == f"/dev/{disk}")
        Path(link).unlink()
        del self.links[link]
        del self.blk[f"/dev/{disk}"]
        _rmtree(self.sysfs / "block" / disk)
        _rmtree(self.sysfs / "class" / "iscsi_session" / f"session{sid}")
        self.sessions[sid] = (portal, iqn, "")

    def _iscsiadm(self, args: list[str], stdin: str | None) -> str:
        if args[:2] == ["-m", "session"]:
            if len(args) > 2:
                return ""  # --rescan
            if not self.sessions:
                raise fail(args, "iscsiadm: No active sessions.", 21)
            return "".join(
                f"tcp: [{sid}] {portal},1 {iqn} (non-flash)\n"
                for sid, (portal, iqn, _) in sorted(self.sessions.items())
            )
        assert args[:2] == ["-m", "node"], args
        iqn, portal, rest = args[3], args[5], args[6:]
        key = (portal, iqn)
        if not rest:
            if key not in self.records:
                raise fail(args, "iscsiadm: No records found", 21)
            return f"node.name = {iqn}\n"
        if rest[:2] == ["-o", "new"]:
            self.records.add(key)
        elif rest[:2] == ["-o", "delete"]:
            if key not in self.records:
                raise fail(args, "iscsiadm: No records found", 21)
            self.records.discard(key)
        elif rest[0] == "--login":
            if key not in self.targets:
                raise fail(args, "iscsiadm: Could not login to [...]: connection timed out", 8)
            self._login(portal, iqn)
        elif rest[0] == "--logout":
            sid = next((s for s, v in self.sessions.items() if v[:2] == key), None)
            if sid is None:
                raise fail(args, "iscsiadm: No matching sessions found", 21)
            self._drop_disk(sid)
            del self.sessions[sid]
        return ""

    def _login(self, portal: str, iqn: str) -> None:
        self.sid += 1
        self.disk += 1
        disk = "sd" + "abcdefghijklmnop"[self.disk - 1]
        devno = f"8:{16 * (self.disk - 1)}"
        self.sessions[self.sid] = (portal, iqn, disk)
        link = str(self.by_path / f"ip-{portal}-iscsi-{iqn}-lun-1")
        Path(link).write_text("")
        self.links[link] = f"/dev/{disk}"
        self.blk[f"/dev/{disk}"] = (devno, self.targets[(portal, iqn)], True)
        lun = (
            self.sysfs
            / "class"
            / "iscsi_session"
            / f"session{self.sid}"
            / "device"
            / f"target{self.sid}:0:0"
            / f"{self.sid}:0:0:1"
            / "block"
            / disk
        )
        lun.mkdir(parents=True)
        (self.sysfs / "block" / disk / "device").mkdir(parents=True)
        (self.sysfs / "block" / disk / "device" / "delete").write_text("")
        state = self.sysfs / "dev" / "block" / devno / "device"
        state.mkdir(parents=True, exist_ok=True)
        (state / "state").write_text("running\n")

    def disk_of(self, portal: str) -> str:
        return next(f"/dev/{d}" for p, _, d in self.sessions.values() if p == portal)

    # -- what is left ------------------------------------------------------------------------
    def leftovers(self) -> dict[str, Any]:
        return {
            "dm": sorted(self.devs),
            "sessions": sorted(self.sessions.values()),
            "records": sorted(self.records),
            "loops": sorted(self.loops),
        }


def _devno(word: str) -> bool:
    major, sep, minor = word.partition(":")
    return bool(sep) and major.isdigit() and minor.isdigit()


def _rmtree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _rmtree(child)
        path.rmdir()
    elif path.exists():
        path.unlink()


class FakeIO:
    """Block device bytes, sparse, by path."""

    def __init__(self) -> None:
        self.data: dict[str, dict[int, bytes]] = {}

    def write(self, path: str, offset: int, data: bytes) -> None:
        self.data.setdefault(path, {})[offset] = data

    def read(self, path: str, offset: int, size: int) -> bytes:
        for start, data in self.data.get(path, {}).items():
            if start <= offset < start + len(data):
                return data[offset - start : offset - start + size]
        return b"\0" * size


class FakeBcache(bcache.BcacheSysfs):
    """bcache's sysfs as the kernel answers it, over the fake kernel and disk bytes."""

    def __init__(self, kernel: FakeKernel, io: FakeIO) -> None:
        self.k, self.io = kernel, io
        self.regs: dict[str, dict[str, Any]] = {}  # kname -> registration
        self.sets: set[str] = set()
        self.log: list[tuple[str, ...]] = []
        self.count = 0

    def _name(self, kname: str) -> str:
        minor = int(kname.removeprefix("dm-"))
        return next(n for n, d in self.k.devs.items() if d.minor == minor)

    def register(self, device: str) -> None:
        name = device.removeprefix("/dev/mapper/")
        kname = f"dm-{self.k.devs[name].minor}"
        self.log.append(("register", name))
        if name == "vmt_cacheset":
            sb = bcache.parse_superblock(self.io.read(device, 4096, 4096))
            assert sb is not None and not sb.backing
            self.sets.add(sb.set_uuid)
            self.regs[kname] = {"kind": "cache", "set": sb.set_uuid}
            return
        head = self.k.devs[name].lines[0].split()  # 0 16 linear <raw devno> <offset>
        raw = next(p for p, v in self.k.blk.items() if v[0] == head[3])
        sb = bcache.parse_superblock(self.io.read(raw, int(head[4]) * 512 + 4096, 4096))
        assert sb is not None and sb.backing, "no backing superblock in the header slot"
        bdev = f"bcache{self.count}"
        self.count += 1
        size = sum(int(line.split()[1]) for line in self.k.devs[name].lines) - 16
        self.k.blk[f"/dev/{bdev}"] = (f"251:{len(self.regs)}", size, False)
        self.regs[kname] = {"kind": "backing", "state": "no cache", "dev": bdev}

    def registered(self, kname: str) -> bool:
        return kname in self.regs

    def set_exists(self, set_uuid: str) -> bool:
        return set_uuid in self.sets

    def state(self, kname: str) -> str:
        return str(self.regs[kname]["state"])

    def attach(self, kname: str, set_uuid: str) -> None:
        assert set_uuid in self.sets
        self.log.append(("attach", self._name(kname), set_uuid))
        self.regs[kname]["state"] = "clean"

    def detach(self, kname: str) -> None:
        self.log.append(("detach", self._name(kname)))
        self.regs[kname]["state"] = "no cache"

    def stop(self, kname: str) -> None:
        self.log.append(("stop", self._name(kname)))
        bdev = f"/dev/{self.regs[kname]['dev']}"
        assert not self.k._held(bdev), "bcache stopped under a table"
        del self.k.blk[bdev]
        del self.regs[kname]

    def bcache_device(self, kname: str) -> str | None:
        return self.regs[kname].get("dev")

    def tune_backing(self, kname: str) -> None:
        self.log.append(("sequential_cutoff 0", self._name(kname)))

    def tune_set(self, set_uuid: str) -> None:
        self.log.append(("congested 0", set_uuid))

    def unregister_set(self, set_uuid: str) -> None:
        self.log.append(("unregister", set_uuid))
        self.sets.discard(set_uuid)
        for kname in [k for k, r in self.regs.items() if r.get("set") == set_uuid]:
            del self.regs[kname]


@dataclass
class Rig:
    kernel: FakeKernel
    io: FakeIO
    bcache: FakeBcache
    rts: Any
    settings: Settings
    tmp: Path
    qsd: Any = None

    def driver(self) -> DmDriver:
        host = Host(
            execute=self.kernel,
            devno=self.kernel.devno,
            block_device=self.kernel.block_device,
            realpath=self.kernel.realpath,
            sysfs=self.kernel.sysfs,
            by_path_dir=self.kernel.by_path,
            rtslib=self.rts,
            io=self.io,  # type: ignore[arg-type]
            bcache=self.bcache,
            qsd=self.qsd,
        )
        return DmDriver(self.settings, host=host, timeout_s=1.0, monitor_interval_s=0)

    def leftovers(self) -> dict[str, Any]:
        left = self.kernel.leftovers()
        left["lio"] = [t.wwn for t in self.rts.state["targets"]] + [
            so.name for so in self.rts.state["sos"]
        ]
        left["bcache"] = sorted(self.bcache.regs)
        return left


NOTHING = {"dm": [], "sessions": [], "records": [], "loops": [], "lio": [], "bcache": []}


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    kernel = FakeKernel(tmp_path)
    io = FakeIO()
    settings = Settings(
        host_ip="10.0.0.9",
        master_url="http://127.0.0.1:1",
        master_token=None,
        heartbeat_interval=1,
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        instances_dir=tmp_path / "instances",
        run_dir=tmp_path / "run",
        chap_user="vmt",
        chap_password="s3cret-Relay-pw!",
        parent_wait_timeout=1,
        dm_cache_device=RAW,
    )
    return Rig(kernel, io, FakeBcache(kernel, io), fake_rtslib(tmp_path), settings, tmp_path)


def created(kernel: FakeKernel) -> list[tuple[list[str], str | None]]:
    return [(a, s) for a, s in kernel.calls if a[:2] == ["dmsetup", "create"]]


# -- tables and names ----------------------------------------------------------------------------
def test_failover_multipath_puts_each_path_in_its_own_group_in_order() -> None:
    table = FailoverMultipath(length=SIZE, paths=("/dev/sdb", "/dev/sda"))
    assert table.line() == (
        "0 65536 multipath 1 queue_if_no_path 0 2 1 "
        "queue-length 0 1 1 /dev/sdb 1 queue-length 0 1 1 /dev/sda 1"
    )


def test_bcache_superblocks_are_what_make_bcache_writes() -> None:
    # made by make-bcache 1.0.8 (bcache-tools) on a 64 MiB file: -C, then -B
    cache = bytes.fromhex(
        "94db2d0ed179b45608000000000000000000000000000000c68573f64e1a45ca"
        "8265f57f48ba6d8138f14bbf950e49e2a98bf9fbebb47794b1b70f9376b348ec"
        "a745028d069a24d3" + "00" * 112 + "8000000000000000"
        "0800000401000000000000000100" + "0000"
    )
    sb = bcache.parse_superblock(cache.ljust(4096, b"\0"))
    assert sb is not None and not sb.backing and sb.nbuckets == 128
    assert sb.set_uuid == "b1b70f93-76b3-48ec-a745-028d069a24d3"
    assert sb.pack() == cache.ljust(4096, b"\0")
    backing = bcache.backing_superblock("195fbddd-94c9-41b5-99b5-17d93228c458")
    again = bcache.parse_superblock(backing.pack())
    assert again is not None and again.backing and again.data_offset == 16
    assert bcache.parse_superblock(b"\0" * 4096) is None
    corrupt = bytearray(backing.pack())
    corrupt[100] ^= 1
    assert bcache.parse_superblock(bytes(corrupt)) is None


def test_a_superblock_the_kernel_rewrote_still_parses() -> None:
    """A running cache set's superblock: version 3, its journal buckets listed after the
    header and in the checksum (what made a restarted virtman refuse its own cache set)."""
    sb = bcache.cache_superblock(1 << 21, "b1b70f93-76b3-48ec-a745-028d069a24d3")
    raw = bytearray(sb.pack())
    raw[16:24] = (3).to_bytes(8, "little")  # BCACHE_SB_VERSION_CDEV_WITH_UUID
    raw[206:208] = (2).to_bytes(2, "little")  # keys
    raw[208:224] = (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    raw[0:8] = bcache.crc64(bytes(raw[8:224])).to_bytes(8, "little")
    again = bcache.parse_superblock(bytes(raw))
    assert again is not None and not again.backing and again.set_uuid == sb.set_uuid


def test_bucket_size_keeps_at_least_1024_buckets() -> None:
    assert bucket_sectors_for(64 << 21) == 1024  # 64 GiB: 512 KiB buckets
    assert bucket_sectors_for(1 << 19) == 512  # 256 MiB
    with pytest.raises(ValueError, match="too small"):
        bucket_sectors_for(4096)


def test_the_driver_needs_chap(rig: Rig) -> None:
    rig.settings = Settings(**{**rig.settings.__dict__, "chap_password": None})
    with pytest.raises(ValueError, match="CHAP"):
        rig.driver()


def test_an_image_tgtd_cannot_share_the_lio_port(rig: Rig) -> None:
    rig.settings = Settings(**{**rig.settings.__dict__, "dm_image_port": 3260})
    with pytest.raises(ValueError, match="dm_image_port"):
        rig.driver()


# -- a build ---------------------------------------------------------------------------------------
def build(rig: Rig) -> tuple[DmDriver, Virtman, FakeVolt]:
    driver = rig.driver()
    volt = FakeVolt("10.0.0.9")
    virtman = Virtman(settings=rig.settings, driver=driver, volt=volt, heartbeat=False)
    return driver, virtman, volt


def test_a_build_makes_the_originals_stack_with_exact_tables(rig: Rig) -> None:
    driver, virtman, _ = build(rig)
    assert virtman.create("vm1", "img", CONNECTION) == "0:/dev/mapper/snapshot_vm1"
    k = rig.kernel
    tables = {a[2]: (s or "").strip() for a, s in created(k)}
    header = HEADER_SECTORS
    assert tables == {
        "vmt_cacheset": f"0 {RAW_SECTORS - header} linear /dev/vdb {header}",
        "multipath_volume-img": "0 65536 multipath 1 queue_if_no_path 0 1 1 "
        "queue-length 0 1 1 /dev/sda 1",
        "cachebk_volume-img": "0 16 linear /dev/vdb 0\n"
        "16 65536 linear /dev/mapper/multipath_volume-img 0",
        "cached_volume-img": "0 65536 linear /dev/bcache0 0",
        "origin_volume-img": "0 65536 snapshot-origin /dev/mapper/cached_volume-img",
        "relay_volume-img": "0 65536 linear /dev/mapper/cached_volume-img 0",
        "snapshot_vm1": "0 65536 snapshot /dev/mapper/cached_volume-img /dev/loop0 P 8",
    }
    flags = {a[2]: a[3:] for a, _ in created(k)}
    assert flags["multipath_volume-img"] == ["--uuid", "VMT-multipath-volume-img", "--readonly"]
    assert flags["snapshot_vm1"] == ["--uuid", "VMT-snapshot-vm1"]
    logins = [a for a in k.argvs("iscsiadm") if "--login" in a]
    assert logins == [["iscsiadm", "-m", "node", "-T", IQN, "-p", SERVER, "--login"]]
    assert ("attach", "cachebk_volume-img", driver.cacheset.set_uuid) in rig.bcache.log
    assert ("sequential_cutoff 0", "cachebk_volume-img") in rig.bcache.log
    sb = bcache.parse_superblock(rig.io.read(RAW, 4096, 4096))  # slot 0's header
    assert sb is not None and sb.backing
    export = driver.lio.get(IQN)
    assert export is not None
    assert (export.device, export.lun, export.portals, export.readonly) == (
        "/dev/mapper/relay_volume-img",
        1,
        ("10.0.0.9:3260",),
        True,
    )
    assert export.initiators is None and export.chap_user == "vmt"
    assert k.loops == {"/dev/loop0": str(rig.settings.instances_dir / "vm1.cow")}
    cow = rig.settings.instances_dir / "vm1.cow"
    assert cow.stat().st_size == (SIZE * 512) * 110 // 100 + (8 << 20)
    assert driver.origin(IMAGE) is not None
    assert driver.images() == {IMAGE}
    assert driver.snapshot.list_owned() == ["vm1"]


def test_a_second_image_takes_the_next_header_slot(rig: Rig) -> None:
    driver, virtman, _ = build(rig)
    other = "iqn.2010-10.org.openstack:volume-two"
    rig.kernel.targets[(SERVER, other)] = 2048
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    conn = {**CONNECTION, "target_iqn": other}
    assert virtman.create("vm2", "two", conn) == "0:/dev/mapper/snapshot_vm2"
    tables = {a[2]: (s or "") for a, s in created(rig.kernel)}
    assert tables["cachebk_volume-two"].startswith("0 16 linear /dev/vdb 16\n")
    assert driver.cacheset.backings() == {"volume-img": 0, "volume-two": 1}


# -- parent changes ---------------------------------------------------------------------
def test_a_parent_change_adds_the_new_paths_reloads_then_drops_the_old(rig: Rig) -> None:
    driver, virtman, volt = build(rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    for host in ("10.0.0.2", "10.0.0.3"):
        rig.kernel.targets[(f"{host}:3260", IQN)] = SIZE
    volt.parents[IMAGE] = [ready("10.0.0.2", IMAGE), ready("10.0.0.3", IMAGE)]
    k = rig.kernel
    k.calls.clear()
    virtman.heartbeat()
    sda_gone = "/dev/sda" not in k.blk
    steps = [
        " ".join(a[:2] + a[-2:] if a[0] == "iscsiadm" else a)
        for a, _ in k.calls
        if (a[0] == "dmsetup" and a[1] in ("suspend", "reload", "resume"))
        or "--login" in a
        or "--logout" in a
    ]
    assert steps == [
        "iscsiadm -m 10.0.0.2:3260 --login",  # the parent offers NBD too: iSCSI is used
        "iscsiadm -m 10.0.0.3:3260 --login",
        "dmsetup suspend --noflush multipath_volume-img",
        "dmsetup reload --readonly multipath_volume-img",
        "dmsetup resume multipath_volume-img",
        f"iscsiadm -m {SERVER} --logout",  # the image server's path, last
    ]
    reload = next(s for a, s in k.calls if a[1] == "reload")
    assert reload == (
        "0 65536 multipath 1 queue_if_no_path 0 2 1 "
        "queue-length 0 1 1 /dev/sdb 1 queue-length 0 1 1 /dev/sdc 1\n"
    )
    assert sda_gone
    assert [e.portal for e in driver.upstream.endpoints(IMAGE)] == [
        "10.0.0.2:3260",
        "10.0.0.3:3260",
    ]
    # the same parents again: nothing is done
    k.calls.clear()
    virtman.heartbeat()
    assert not [a for a, _ in k.calls if "--login" in a or a[1:2] == ["reload"]]


def test_the_heartbeat_reports_the_sectors_read_through_each_path(rig: Rig) -> None:
    """Per source, the kernel's count of sectors read from that path's SCSI disk."""
    driver, virtman, volt = build(rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    for host in ("10.0.0.2", "10.0.0.3"):
        rig.kernel.targets[(f"{host}:3260", IQN)] = SIZE
    volt.parents[IMAGE] = [ready("10.0.0.2", IMAGE), ready("10.0.0.3", IMAGE)]
    virtman.heartbeat()  # now on /dev/sdb (10.0.0.2) and /dev/sdc (10.0.0.3)
    stat = "{} 0 {} 5 0 0 0 0 0 6 5 0 0 0 0 0 0\n"
    (rig.kernel.sysfs / "block" / "sdb" / "stat").write_text(stat.format(40, 2048))
    (rig.kernel.sysfs / "block" / "sdc" / "stat").write_text(stat.format(0, 0))
    counted = {e.peer_id: n for e, n in driver.upstream.read_counters(IMAGE).items()}
    assert counted == {f"10.0.0.2:{IMAGE}": 2048 * 512, f"10.0.0.3:{IMAGE}": 0}
    virtman.heartbeat()
    assert volt.bytes_read == [
        {"peer_id": f"10.0.0.9:{IMAGE}", "source": f"10.0.0.2:{IMAGE}", "bytes": 2048 * 512},
        {"peer_id": f"10.0.0.9:{IMAGE}", "source": f"10.0.0.3:{IMAGE}", "bytes": 0},
    ]
    (rig.kernel.sysfs / "block" / "sdc" / "stat").unlink()  # a path not counted: left out
    assert [e.peer_id for e in driver.upstream.read_counters(IMAGE)] == [f"10.0.0.2:{IMAGE}"]


def test_a_parent_that_cannot_be_reached_is_skipped(rig: Rig) -> None:
    driver, virtman, volt = build(rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    rig.kernel.targets[("10.0.0.3:3260", IQN)] = SIZE
    volt.parents[IMAGE] = [ready("10.0.0.2", IMAGE), ready("10.0.0.3", IMAGE)]  # .2 is dead
    virtman.heartbeat()
    assert [e.portal for e in driver.upstream.endpoints(IMAGE)] == ["10.0.0.3:3260"]
    assert ("10.0.0.2:3260", IQN) not in rig.kernel.records  # its record was removed


def test_a_failed_reload_keeps_the_old_paths_and_closes_the_new(rig: Rig) -> None:
    driver, virtman, volt = build(rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    rig.kernel.targets[("10.0.0.2:3260", IQN)] = SIZE
    volt.parents[IMAGE] = [ready("10.0.0.2", IMAGE)]
    rig.kernel.fail_on.append(("dmsetup", "reload"))
    virtman.heartbeat()  # logged, not raised
    assert [e.portal for e in driver.upstream.endpoints(IMAGE)] == [SERVER]
    assert [s[0] for s in rig.kernel.sessions.values()] == [SERVER]
    assert "/dev/sda" in rig.kernel.devs["multipath_volume-img"].lines[0] or (
        "8:0" in rig.kernel.devs["multipath_volume-img"].lines[0]
    )


def test_a_path_that_works_again_is_reinstated_and_reads_go_back_to_it(rig: Rig) -> None:
    driver, _virtman, _ = build(rig)
    rig.kernel.targets[("10.0.0.2:3260", IQN)] = SIZE
    driver.upstream.ensure(
        UpstreamSpec(
            IMAGE,
            (
                Endpoint(SERVER, IQN),
                Endpoint("10.0.0.2:3260", IQN),
            ),
        )
    )
    mp = rig.kernel.devs["multipath_volume-img"]
    mp.paths["8:0"] = False  # the first path failed, the kernel moved to group 2
    mp.group = 2
    driver.check_paths()  # its SCSI device is running again (fake sysfs)
    assert rig.kernel.messages == [
        ("multipath_volume-img", "reinstate_path", "8:0"),
        ("multipath_volume-img", "switch_group", "1"),
    ]


def test_no_failback_while_the_first_group_is_in_use(rig: Rig) -> None:
    driver, _, _ = build(rig)
    rig.kernel.targets[("10.0.0.2:3260", IQN)] = SIZE
    driver.upstream.ensure(
        UpstreamSpec(
            IMAGE,
            (
                Endpoint(SERVER, IQN),
                Endpoint("10.0.0.2:3260", IQN),
            ),
        )
    )
    driver.check_paths()
    driver.check_paths()
    assert rig.kernel.messages == []


# -- teardown and undo -------------------------------------------------------------------
def test_destroy_and_shutdown_leave_nothing(rig: Rig) -> None:
    _driver, virtman, _ = build(rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    assert virtman.destroy("vm1") == "0:"
    virtman.shutdown()
    assert rig.leftovers() == NOTHING
    assert ("detach", "cachebk_volume-img") in rig.bcache.log
    assert rig.bcache.log[-1][0] == "unregister"
    assert rig.io.read(RAW, 4096, 4096) == b"\0" * 4096  # the slot's superblock is zeroed
    assert not list(rig.settings.instances_dir.glob("*.cow"))


def test_teardown_of_the_cache_refuses_while_a_snapshot_holds_it(rig: Rig) -> None:
    driver, virtman, _ = build(rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    with pytest.raises(Exception, match="busy"):
        driver.cache.teardown(IMAGE)
    assert "snapshot_vm1" in rig.kernel.devs


@pytest.mark.parametrize(
    "failing",
    [
        ("dmsetup", "create", "multipath_volume-img"),
        ("dmsetup", "create", "cached_volume-img"),
        ("dmsetup", "create", "relay_volume-img"),
        ("dmsetup", "create", "snapshot_vm1"),
        ("losetup", "--find"),
    ],
)
def test_a_failed_step_is_undone_and_leaves_nothing(rig: Rig, failing: tuple[str, ...]) -> None:
    _driver, virtman, _ = build(rig)
    before = rig.leftovers()
    rig.kernel.fail_on.append(failing)
    answer = virtman.create("vm1", "img", CONNECTION)
    assert answer.startswith("2:"), answer
    virtman.heartbeat()  # the unused image goes
    assert rig.leftovers() == before == {**NOTHING, "dm": ["vmt_cacheset"], "bcache": ["dm-1"]}
    assert virtman.list() == []
    rig.kernel.fail_on.clear()
    assert virtman.create("vm1", "img", CONNECTION) == "0:/dev/mapper/snapshot_vm1"


def test_a_failed_lio_export_is_undone(rig: Rig) -> None:
    _driver, virtman, _ = build(rig)
    rig.rts.NetworkPortal = _broken
    assert virtman.create("vm1", "img", CONNECTION).startswith("2:")
    virtman.heartbeat()
    assert rig.leftovers() == {**NOTHING, "dm": ["vmt_cacheset"], "bcache": ["dm-1"]}


def _broken(*args: object, **kw: object) -> None:
    raise RuntimeError("Could not create NetworkPortal in configFS")


def test_no_path_at_all_fails_the_create_cleanly(rig: Rig) -> None:
    driver, virtman, _ = build(rig)
    del rig.kernel.targets[(SERVER, IQN)]
    answer = virtman.create("vm1", "img", CONNECTION)
    assert answer.startswith("2:") and "no path" in answer
    assert rig.leftovers() == {**NOTHING, "dm": ["vmt_cacheset"], "bcache": ["dm-1"]}
    with pytest.raises(PathsUnavailable):
        driver.upstream.ensure(UpstreamSpec(IMAGE, (Endpoint(SERVER, IQN),)))
    assert (
        not (rig.settings.run_dir / "paths" / f"{IMAGE}.json").exists()
        or json.loads((rig.settings.run_dir / "paths" / f"{IMAGE}.json").read_text()) == []
    )


# -- reconcile ---------------------------------------------------------------------------
def test_a_restarted_virtman_adopts_the_stack_and_the_vm(rig: Rig) -> None:
    _, virtman, _ = build(rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    tables = {n: list(d.lines) for n, d in rig.kernel.devs.items()}
    sessions = dict(rig.kernel.sessions)
    virtman.close()  # a kill -9: nothing torn down
    rig.kernel.calls.clear()
    driver, again, volt = build(rig)
    assert again.list() == ["vm1:volume-img"]
    assert {n: list(d.lines) for n, d in rig.kernel.devs.items()} == tables
    assert rig.kernel.sessions == sessions
    assert not created(rig.kernel) or all(a[2] in tables for a, _ in created(rig.kernel))
    assert not [a for a, _ in rig.kernel.calls if a[1:2] == ["remove"]]
    assert driver.lio.get(IQN) is not None
    assert ("register", IMAGE, "10.0.0.9:volume-img", "") in volt.calls
    assert rig.bcache.log.count(("register", "vmt_cacheset")) == 1  # adopted, not remade


def test_reconcile_removes_a_half_built_stack(rig: Rig) -> None:
    driver = rig.driver()
    driver.start()
    driver.upstream.ensure(
        UpstreamSpec(IMAGE, (Endpoint(SERVER, IQN),))
    )  # a crash after the multipath
    assert driver.images() == {IMAGE} and driver.origin(IMAGE) is None
    _, virtman, _ = build(rig)
    assert virtman.list() == []
    assert rig.leftovers() == {**NOTHING, "dm": ["vmt_cacheset"], "bcache": ["dm-1"]}


def test_devices_without_our_uuid_are_never_touched(rig: Rig) -> None:
    driver = rig.driver()
    driver.start()
    rig.kernel(["dmsetup", "create", "multipath_volume-img"], stdin="0 8 linear /dev/vdb 0\n")
    assert driver.images() == set()
    driver.upstream.teardown(IMAGE)
    driver.sweep(set())
    assert "multipath_volume-img" in rig.kernel.devs


# -- NBD relay (dm_nbd_relay) --------------------------------------------------------------
class FakeQsd:
    """The qemu-storage-daemon calls ``NbdRelay`` makes; its host_device nodes hold their
    block device open in the fake kernel (``dmsetup remove`` of it says busy)."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.alive = False
        self.server: str | None = None
        self.devices: dict[str, str] = {}  # node -> device
        self.exported: dict[str, tuple[str, str]] = {}  # export id -> node, name
        self.fail_export = False
        self.fail_server = False
        self.tls: str | None = None  # the NBD server's credentials
        self.objects: dict[str, tuple[str, str, str]] = {}  # id -> dir, endpoint, username

    def adopt(self) -> bool:
        return self.alive

    def start(self) -> None:
        self.alive = True

    def running(self) -> bool:
        return self.alive

    def detach(self) -> None:
        pass

    def stop(self) -> None:
        assert not self.exported, "stopped with exports"
        self.alive = False
        self.server = None
        self.tls = None
        self.objects = {}

    def start_nbd_server(self, host: str, port: int, *, tls_creds: str | None = None) -> None:
        if self.fail_server:
            raise CommandFailed(["nbd-server-start"], 1, "Address already in use")
        assert tls_creds is None or tls_creds in self.objects
        self.server = f"{host}:{port}"
        self.tls = tls_creds

    def stop_nbd_server_unless_tls(self, tls_creds: str | None) -> bool:
        if self.server is None or self.tls == tls_creds:
            return False
        self.server, self.tls, self.exported = None, None, {}
        return True

    def add_tls_psk(self, obj_id: str, psk_dir: Path, *, endpoint: str, username: str = "") -> bool:
        wanted = (str(psk_dir), endpoint, username)
        if obj_id in self.objects:
            assert self.objects[obj_id] == wanted
            return False
        self.objects[obj_id] = wanted
        return True

    def delete_object(self, obj_id: str) -> None:
        self.objects.pop(obj_id, None)

    @property
    def nbd_server(self) -> str | None:
        return self.server

    def nodes(self) -> list[str]:
        return sorted(self.devices)

    def node_info(self, node: str) -> dict[str, Any] | None:
        return {"file": self.devices[node]} if node in self.devices else None

    def add_host_device(self, node: str, path: str, *, read_only: bool) -> None:
        assert read_only and self.alive
        if node not in self.devices:
            if path not in self.kernel.blk:
                raise CommandFailed(["blockdev-add"], 1, f"Could not open '{path}'")
            self.devices[node] = path
            self.kernel.opened.add(path)

    def export_nbd(self, export_id: str, node: str, name: str) -> None:
        if self.fail_export:
            raise CommandFailed(["block-export-add"], 1, "export failed")
        assert self.server and node in self.devices
        self.exported[export_id] = (node, name)

    def exports(self) -> list[Export]:
        return [Export(e, "nbd", node) for e, (node, _) in self.exported.items()]

    def delete_export(self, export_id: str, *, force: bool = False) -> None:
        assert force  # its clients fail over; they must not keep the device
        self.exported.pop(export_id, None)

    def delete_node(self, node: str) -> None:
        assert node not in {n for n, _ in self.exported.values()}, "node still exported"
        if node in self.devices:
            self.kernel.opened.discard(self.devices.pop(node))


@pytest.fixture
def nbd_rig(rig: Rig) -> Rig:
    rig.settings = Settings(**{**rig.settings.__dict__, "dm_nbd_relay": True})
    rig.qsd = FakeQsd(rig.kernel)
    return rig


def test_with_nbd_the_relay_also_exports_the_cached_device_over_nbd(nbd_rig: Rig) -> None:
    _, virtman, volt = build(nbd_rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    qsd = nbd_rig.qsd
    assert qsd.server == "10.0.0.9:10809"
    assert list(qsd.exported.values()) == [(next(iter(qsd.devices)), IMAGE)]
    assert list(qsd.devices.values()) == ["/dev/mapper/cached_volume-img"]
    assert ("place_and_register", IMAGE, "10.0.0.9:volume-img", "10.0.0.9:10809") in volt.calls
    with pytest.raises(CommandFailed, match="busy"):  # the export holds the cached device
        nbd_rig.kernel(["dmsetup", "remove", "cached_volume-img"])
    assert virtman.destroy("vm1") == "0:"
    virtman.shutdown()
    assert nbd_rig.leftovers() == NOTHING
    assert qsd.exported == {} and qsd.devices == {} and not qsd.alive


def test_a_restart_adopts_the_nbd_export(nbd_rig: Rig) -> None:
    _, virtman, _ = build(nbd_rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    exported = dict(nbd_rig.qsd.exported)
    virtman.close()  # a kill -9: the daemon and its export stay
    _, again, volt = build(nbd_rig)
    assert again.list() == ["vm1:volume-img"]
    assert nbd_rig.qsd.exported == exported
    assert ("register", IMAGE, "10.0.0.9:volume-img", "10.0.0.9:10809") in volt.calls


def test_stop_leaves_the_nbd_daemon_while_it_exports(nbd_rig: Rig) -> None:
    driver, virtman, _ = build(nbd_rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    driver.stop()  # virtman stopped without destroying: children keep reading
    assert nbd_rig.qsd.alive and nbd_rig.qsd.exported


def test_a_failed_nbd_export_is_undone(nbd_rig: Rig) -> None:
    _, virtman, _ = build(nbd_rig)
    nbd_rig.qsd.fail_export = True
    answer = virtman.create("vm1", "img", CONNECTION)
    assert answer.startswith("2:") and "export failed" in answer, answer
    virtman.heartbeat()
    assert nbd_rig.leftovers() == {**NOTHING, "dm": ["vmt_cacheset"], "bcache": ["dm-1"]}
    assert nbd_rig.qsd.devices == {} and nbd_rig.qsd.exported == {}


def test_issue_10_with_a_psk_file_the_nbd_relay_requires_tls(nbd_rig: Rig) -> None:
    key = nbd_rig.tmp / "nbd.psk"
    key.write_text("vmt:" + "ab" * 32 + "\n")
    key.chmod(0o600)
    nbd_rig.settings = Settings(**{**nbd_rig.settings.__dict__, "nbd_psk_file": key})
    _, virtman, _ = build(nbd_rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    qsd = nbd_rig.qsd
    psk_dir = nbd_rig.settings.run_dir / "nbd-psk"
    assert qsd.tls == "vmtdm-psk-server"
    assert qsd.objects == {"vmtdm-psk-server": (str(psk_dir), "server", "")}
    assert (psk_dir / "keys.psk").read_text() == key.read_text()
    assert stat.S_IMODE((psk_dir / "keys.psk").stat().st_mode) == 0o600
    assert stat.S_IMODE(psk_dir.stat().st_mode) == 0o700
    virtman.close()  # a kill -9: a restart adopts the credentials, no second object
    _, again, _ = build(nbd_rig)
    assert again.list() == ["vm1:volume-img"]
    assert list(qsd.objects) == ["vmtdm-psk-server"] and qsd.tls == "vmtdm-psk-server"


def test_issue_10_credentials_are_removed_when_the_nbd_server_fails(nbd_rig: Rig) -> None:
    key = nbd_rig.tmp / "nbd.psk"
    key.write_text("vmt:" + "ab" * 32 + "\n")
    key.chmod(0o600)
    nbd_rig.settings = Settings(**{**nbd_rig.settings.__dict__, "nbd_psk_file": key})
    nbd_rig.qsd.fail_server = True
    driver = nbd_rig.driver()
    with pytest.raises(CommandFailed, match="Address already in use"):
        driver.nbd.start()
    assert nbd_rig.qsd.objects == {} and nbd_rig.qsd.server is None


def test_the_nbd_relay_needs_nbd_port(nbd_rig: Rig) -> None:
    nbd_rig.settings = Settings(**{**nbd_rig.settings.__dict__, "nbd_port": 0})
    with pytest.raises(ValueError, match="nbd_port"):
        nbd_rig.driver()


def _nbd_daemon_killed(nbd_rig: Rig) -> tuple[Any, FakeQsd, dict[str, tuple[str, str]]]:
    """A relay exported over NBD, then its daemon killed: (driver, daemon, its exports)."""
    driver, virtman, _ = build(nbd_rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    qsd = nbd_rig.qsd
    exported = dict(qsd.exported)
    qsd.alive, qsd.server, qsd.exported, qsd.devices = False, None, {}, {}  # kill -9
    nbd_rig.kernel.opened.clear()
    return driver, qsd, exported


def test_a_dead_nbd_daemon_is_started_again_with_every_export(nbd_rig: Rig) -> None:
    driver, qsd, exported = _nbd_daemon_killed(nbd_rig)
    driver.check_nbd()
    assert qsd.alive and qsd.server == "10.0.0.9:10809"
    assert qsd.exported == exported
    assert list(qsd.devices.values()) == ["/dev/mapper/cached_volume-img"]
    driver.check_nbd()  # alive: nothing to do
    assert qsd.exported == exported


def test_a_daemon_that_cannot_start_its_nbd_server_is_stopped_and_healed_next_time(
    nbd_rig: Rig,
) -> None:
    # A guest's restarted daemon answered no object-add in 30 s (QEMU generating DH
    # parameters under TCG): left running, it had no NBD server and no pass retried.
    driver, qsd, exported = _nbd_daemon_killed(nbd_rig)
    qsd.fail_server = True
    with pytest.raises(CommandFailed):
        driver.nbd.heal(lambda: {"volume-img": "/dev/mapper/cached_volume-img"})
    assert not qsd.alive  # stopped again, not left without a server
    qsd.fail_server = False
    driver.check_nbd()  # the monitor's next pass
    assert qsd.alive and qsd.server == "10.0.0.9:10809" and qsd.exported == exported


def test_a_teardown_with_a_dead_nbd_daemon_still_removes_everything(nbd_rig: Rig) -> None:
    _, virtman, _ = build(nbd_rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    qsd = nbd_rig.qsd
    qsd.alive, qsd.exported, qsd.devices = False, {}, {}  # died, and the kernel closed its files
    nbd_rig.kernel.opened.clear()
    assert virtman.destroy("vm1") == "0:"
    virtman.shutdown()
    assert nbd_rig.leftovers() == NOTHING


def test_with_nbd_turned_off_the_left_daemon_drains_and_stops(nbd_rig: Rig) -> None:
    _, virtman, _ = build(nbd_rig)
    assert virtman.create("vm1", "img", CONNECTION).startswith("0:")
    virtman.close()  # a kill -9, then dm_nbd_relay turned off
    nbd_rig.settings = Settings(**{**nbd_rig.settings.__dict__, "dm_nbd_relay": False})
    driver, again, volt = build(nbd_rig)
    assert again.list() == ["vm1:volume-img"]
    assert driver.nbd is not None and driver.nbd.draining
    assert ("register", IMAGE, "10.0.0.9:volume-img", "") in volt.calls  # no NBD offered
    assert nbd_rig.qsd.exported  # its child may still read it
    driver.check_nbd()  # nothing healed while draining
    assert again.destroy("vm1") == "0:"
    again.shutdown()
    assert nbd_rig.leftovers() == NOTHING
    assert nbd_rig.qsd.exported == {} and not nbd_rig.qsd.alive


# -- the snapshot layer: create or adopt; a different one is a Conflict -------------------------
def test_a_snapshot_in_place_is_adopted_if_identical_and_refused_if_not(rig: Rig) -> None:
    driver, virtman, _ = build(rig)
    assert virtman.create("vm1", "img", CONNECTION) == "0:/dev/mapper/snapshot_vm1"
    origin = driver.origin(IMAGE)
    assert origin is not None
    creates = len(created(rig.kernel))
    adopted = driver.snapshot.ensure(SnapshotSpec("vm1", origin))
    assert adopted.path == "/dev/mapper/snapshot_vm1" and adopted.size == origin.size
    assert len(created(rig.kernel)) == creates  # nothing made again
    assert driver.snapshot.inspect("vm1") == Device("snapshot_vm1", adopted.path, origin.size)
    other = Device("x", "/dev/mapper/cached_volume-img", origin.size * 2)
    with pytest.raises(Conflict, match="not a snapshot of"):
        driver.snapshot.ensure(SnapshotSpec("vm1", other))
    assert "snapshot_vm1" in rig.kernel.devs  # left as it is
    assert driver.snapshot.inspect("nobody") is None
