"""The layer interface every block-stack driver implements (``qemu`` and ``dm``).

Per image, bottom to top: upstream (paths to parents or image servers + multipath), cache
on read, relay target (+ origin), and per VM a copy-on-write snapshot. Each layer's
``ensure`` creates or adopts (idempotent), ``teardown`` is idempotent ("already gone" is
success). Names are derived from the image or instance name, so a restarted virtman finds
what it built without any in-memory state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from brick.tgt import Chap, TgtAdm


@dataclass(frozen=True)
class Endpoint:
    """One way to read an image: an image server's target, or a parent's relay."""

    portal: str  # "host:port" of the iSCSI target
    iqn: str
    lun: int = 1
    nbd: str | None = None  # "host:port" of an NBD export named after the image
    peer_id: str | None = None  # None: an image server

    @property
    def key(self) -> str:
        """The original's path key; NBD endpoints are keyed by their NBD address."""
        if self.nbd:
            return f"nbd-{self.nbd}"
        return f"ip-{self.portal}-iscsi-{self.iqn}-lun-{self.lun}"

    @property
    def short_id(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:6]


@dataclass(frozen=True)
class Device:
    """What a layer hands to the one above: a path a process can open, and its size."""

    name: str  # the driver's name for it (qsd node name, dm name)
    path: str  # a file or block device path
    size: int


@dataclass(frozen=True)
class Relay:
    iqn: str
    portal: str  # host:port
    nbd: str | None  # host:port, or None when the node exports no NBD


@dataclass(frozen=True)
class Revived:
    """What a node daemon that died and was started again took with it."""

    stacks: bool = False  # every image's stack (paths, cache, origin, relay) is gone
    targets: bool = False  # every iSCSI target (relays and image targets) is gone

    def __bool__(self) -> bool:
        return self.stacks or self.targets


class UpstreamLayer(Protocol):
    def ensure(self, image: str, endpoints: Sequence[Endpoint]) -> Device:
        """Paths to ``endpoints`` (reads go to the first that works, the others are standby)
        behind one device. On an existing device: add the new paths, drop the others, in
        that order, so reads never lack a path. Raises PathsUnavailable if none connects."""
        ...

    def endpoints(self, image: str) -> list[Endpoint]:
        """The paths in place now, in read order."""
        ...

    def teardown(self, image: str) -> None: ...


class CacheLayer(Protocol):
    def ensure(self, image: str, upstream: Device) -> Device:
        """A cache on read over ``upstream``: every block is fetched at most once; the
        returned device is also the origin that snapshots and the relay read."""
        ...

    def teardown(self, image: str, *, keep_file: bool = False) -> None:
        """Remove the cache; ``keep_file``: leave its file for a rebuild to reuse (a repair
        of a degraded image; the ``dm`` driver's cache set is shared and has none)."""
        ...


class RelayLayer(Protocol):
    def ensure(self, image: str, iqn: str, cached: Device) -> Relay:
        """Export ``cached`` read-only under ``iqn`` (LUN 1), with CHAP when configured."""
        ...

    def readers(self, image: str, iqn: str) -> int:
        """How many children read from the relay now."""
        ...

    def teardown(self, image: str, iqn: str | None = None, *, force: bool = False) -> None:
        """Remove the image's relay (found by the image when ``iqn`` is None); ``force``:
        even with readers connected (they are cut off)."""
        ...


@dataclass(frozen=True)
class SnapshotSpec:
    """One VM's disk: a copy-on-write layer over ``origin`` (the image's cached device)."""

    instance: str
    origin: Device


class SnapshotLayer(Protocol):
    def ensure(self, spec: SnapshotSpec) -> Device:
        """Create the VM's copy-on-write disk, or adopt the identical one in place (same
        origin); one that differs raises ``virtman.errors.Conflict`` and is left as it is
        (a VM's disk is deleted only by ``teardown``)."""
        ...

    def inspect(self, instance: str) -> Device | None:
        """The VM's disk as it is now, or None if there is none."""
        ...

    def teardown(self, instance: str) -> None:
        """Delete the VM's disk (idempotent): only an explicit destroy calls this."""
        ...

    def list_owned(self) -> list[str]:
        """Instances that have a disk of ours now."""
        ...


class Driver(Protocol):
    """One backend's layers, plus the daemons they share on this node."""

    # Read-only: a driver may keep narrower types (e.g. ``chap`` always set).
    @property
    def name(self) -> str: ...

    @property
    def upstream(self) -> UpstreamLayer: ...

    @property
    def cache(self) -> CacheLayer: ...

    @property
    def relay(self) -> RelayLayer: ...

    @property
    def snapshot(self) -> SnapshotLayer: ...

    @property
    def tgt(self) -> TgtAdm:
        """tgtd's admin client; the image service (``create_image_target``) uses it."""
        ...

    @property
    def chap(self) -> Chap | None:
        """The CHAP credentials targets are exported with (None: none)."""
        ...

    def start(self) -> None:
        """Start the node's daemons, or adopt those a previous run left running."""
        ...

    def stop(self) -> None:
        """Stop the daemons (call only once every image is torn down)."""
        ...

    def revive(self) -> Revived:
        """Start again every node daemon that died (logged as an error), and say what
        was lost with it; the caller rebuilds that. Nothing died: ``Revived()``."""
        ...

    def images(self) -> set[str]:
        """Images that have anything built now (for reconcile and leak checks)."""
        ...

    def sweep(self, keep: set[str]) -> None:
        """Remove every object of ours that belongs to no image in ``keep``."""
        ...

    def origin(self, image: str) -> Device | None:
        """The cached device of a fully built image, or None if its stack is incomplete."""
        ...
