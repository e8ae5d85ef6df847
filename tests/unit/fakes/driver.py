"""An in-memory block-stack driver (the four layers as dicts; failures and a gate injectable)."""

from __future__ import annotations

import threading

from virtman.errors import Conflict
from virtman.layers.base import (
    CacheSpec,
    Device,
    Endpoint,
    Relay,
    RelaySpec,
    Revived,
    SnapshotSpec,
    UpstreamSpec,
)


class Layers:
    def __init__(self, fail: set[str], gate: threading.Event | None) -> None:
        self.fail = fail
        self.gate = gate
        self.at_gate = threading.Event()  # set once a build waits on ``gate``
        self.upstreams: dict[str, list[Endpoint]] = {}
        self.read_counts: dict[Endpoint, int] = {}  # what read_counters answers, per path
        self.caches: dict[str, Device] = {}
        self.cache_files: set[str] = set()  # what a qemu cache keeps on disk
        self.relays: dict[str, str] = {}
        self.snapshots: dict[str, str] = {}
        self.readers_of: dict[str, int] = {}
        self.forced_relay_teardowns = 0
        self.builds = 0

    def check(self, layer: str) -> None:
        if layer in self.fail:
            raise RuntimeError(f"{layer} broke")


class FakeDriver:
    name = "fake"

    def __init__(self, fail: set[str] | None = None, gate: threading.Event | None = None):
        self.state = Layers(fail or set(), gate)
        self.upstream = _Upstream(self.state)
        self.cache = _Cache(self.state)
        self.relay = _Relay(self.state)
        self.snapshot = _Snapshot(self.state)
        self.started = self.stopped = self.halted = 0
        self.lost = Revived()  # what the next revive() reports

    def start(self) -> None:
        self.started += 1

    def revive(self) -> Revived:
        lost, self.lost = self.lost, Revived()
        return lost

    def crash_daemon(self, *, stacks: bool = False, targets: bool = False) -> None:
        """What a SIGKILLed node daemon takes with it, reported by the next revive()."""
        if stacks:
            self.state.upstreams.clear()
            self.state.caches.clear()
            self.state.relays.clear()
        elif targets:
            self.state.relays.clear()
        self.lost = Revived(stacks=stacks, targets=targets)

    def stop(self) -> None:
        self.stopped += 1

    def halt(self) -> None:
        self.halted += 1

    def images(self) -> set[str]:
        return set(self.state.upstreams) | set(self.state.caches) | set(self.state.relays)

    def sweep(self, keep: set[str]) -> None:
        for image in self.images() - keep:
            self.state.upstreams.pop(image, None)
            self.state.caches.pop(image, None)
            self.state.relays.pop(image, None)

    def origin(self, image: str) -> Device | None:
        return self.state.caches.get(image)

    def empty(self) -> bool:
        s = self.state
        return not (s.upstreams or s.caches or s.relays or s.snapshots)


class _Upstream:
    def __init__(self, s: Layers) -> None:
        self.s = s

    def ensure(self, spec: UpstreamSpec) -> Device:
        image, endpoints = spec.image, spec.endpoints
        if self.s.gate is not None:
            self.s.at_gate.set()
            self.s.gate.wait(10)
        self.s.check("upstream")
        self.s.builds += image not in self.s.upstreams
        self.s.upstreams[image] = list(endpoints)
        return Device(f"{image}-mp", "", 1 << 20)

    def endpoints(self, image: str) -> list[Endpoint]:
        return list(self.s.upstreams.get(image, []))

    def read_counters(self, image: str) -> dict[Endpoint, int]:
        return {e: n for e, n in self.s.read_counts.items() if e in self.s.upstreams.get(image, [])}

    def inspect(self, image: str) -> Device | None:
        return Device(f"{image}-mp", "", 1 << 20) if image in self.s.upstreams else None

    def list_owned(self) -> list[str]:
        return sorted(self.s.upstreams)

    def teardown(self, image: str) -> None:
        self.s.upstreams.pop(image, None)


class _Cache:
    def __init__(self, s: Layers) -> None:
        self.s = s

    def ensure(self, spec: CacheSpec) -> Device:
        image, upstream = spec.image, spec.upstream
        self.s.check("cache")
        there = self.s.caches.get(image)
        if there is not None and there.size != upstream.size:
            raise Conflict(image, "a cache of another size")
        device = Device(f"{image}-cache", f"/fake/{image}.raw", upstream.size)
        self.s.caches[image] = device
        self.s.cache_files.add(image)
        return device

    def teardown(self, image: str, *, keep_file: bool = False) -> None:
        self.s.caches.pop(image, None)
        if not keep_file:
            self.s.cache_files.discard(image)

    def inspect(self, image: str) -> Device | None:
        return self.s.caches.get(image)

    def list_owned(self) -> list[str]:
        return sorted(self.s.caches)


class _Relay:
    def __init__(self, s: Layers) -> None:
        self.s = s

    def ensure(self, spec: RelaySpec) -> Relay:
        self.s.check("relay")
        if self.s.relays.get(spec.image, spec.iqn) != spec.iqn:
            raise Conflict(spec.image, "a relay under another IQN")
        self.s.relays[spec.image] = spec.iqn
        return self._relay(spec.image, spec.iqn)

    def _relay(self, image: str, iqn: str) -> Relay:
        return Relay(
            name=image,
            path=f"/fake/{image}.raw",
            size=1 << 20,
            iqn=iqn,
            portal="10.0.0.9:3260",
            nbd="10.0.0.9:10809",
        )

    def inspect(self, image: str) -> Relay | None:
        iqn = self.s.relays.get(image)
        return None if iqn is None else self._relay(image, iqn)

    def list_owned(self) -> list[str]:
        return sorted(self.s.relays)

    def readers(self, image: str, iqn: str) -> int:
        return self.s.readers_of.get(image, 0)

    def teardown(self, image: str, iqn: str | None = None, *, force: bool = False) -> None:
        self.s.relays.pop(image, None)
        self.s.forced_relay_teardowns += int(force)


class _Snapshot:
    def __init__(self, s: Layers) -> None:
        self.s = s

    def ensure(self, spec: SnapshotSpec) -> Device:
        self.s.check("snapshot")
        if spec.instance in self.s.snapshots:
            raise Conflict(spec.instance, "a disk of that name exists")
        self.s.snapshots[spec.instance] = f"/fake/instances/{spec.instance}.qcow2"
        return Device(spec.instance, self.s.snapshots[spec.instance], spec.origin.size)

    def inspect(self, instance: str) -> Device | None:
        path = self.s.snapshots.get(instance)
        return None if path is None else Device(instance, path, 1 << 20)

    def teardown(self, instance: str) -> None:
        self.s.snapshots.pop(instance, None)

    def list_owned(self) -> list[str]:
        return sorted(self.s.snapshots)
