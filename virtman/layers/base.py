"""The layer interface every block-stack driver implements (``qemu`` and ``dm``).

Per image, bottom to top: upstream (paths to parents or image servers + multipath), cache
on read, relay target (+ origin), and per VM a copy-on-write snapshot. Each layer's
``ensure`` creates or adopts (idempotent), ``teardown`` is idempotent ("already gone" is
success). Names are derived from the image or instance name, so a restarted virtman finds
what it built without any in-memory state.
"""

from __future__ import annotations

import hashlib
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


@dataclass(frozen=True, kw_only=True)
class Relay(Device):
    """The relay layer's device (the exported view of the origin) and the addresses
    children read it at."""

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


# -- what each layer is asked for (its spec) ---------------------------------------------------
@dataclass(frozen=True)
class UpstreamSpec:
    """Paths to ``endpoints`` (read in this order) behind one device."""

    image: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class CacheSpec:
    """A cache on read over ``upstream``; its device is the image's origin."""

    image: str
    upstream: Device


@dataclass(frozen=True)
class RelaySpec:
    """``origin`` exported read-only to children under ``iqn`` (LUN 1)."""

    image: str
    iqn: str
    origin: Device


@dataclass(frozen=True)
class SnapshotSpec:
    """One VM's disk: a copy-on-write layer over ``origin`` (the image's cached device)."""

    instance: str
    origin: Device


# -- the layers --------------------------------------------------------------------------------
# Every layer has the same four calls, keyed by the name in its spec (the image, or the
# instance for the snapshot):
#   ensure(spec) -> Device    create, or adopt what is in place if it is what the spec asks
#                             for; something of that name that differs raises
#                             ``virtman.errors.Conflict`` and is left exactly as it is
#   inspect(name) -> Device | None
#                             what is in place now (None: nothing); changes nothing
#   teardown(name, ...)       remove it; idempotent ("already gone" is success)
#   list_owned() -> [name]    the names this node has something of this layer for (sweep)


class UpstreamLayer(Protocol):
    def ensure(self, spec: UpstreamSpec) -> Device:
        """Paths to ``spec.endpoints`` (reads go to the first that works, the others are
        standby) behind one device. The paths are the part of the spec that may change: on
        an existing device the new paths are added, then the others dropped, so reads never
        lack a path. Raises PathsUnavailable if none connects."""
        ...

    def inspect(self, image: str) -> Device | None: ...

    def endpoints(self, image: str) -> list[Endpoint]:
        """The paths in place now, in read order."""
        ...

    def read_counters(self, image: str) -> dict[Endpoint, int]:
        """Bytes read through each path in place now, since that path was connected; a
        path the driver cannot count is left out (Volt's status page shows per-source
        bytes from these)."""
        ...

    def teardown(self, image: str) -> None: ...

    def list_owned(self) -> list[str]: ...


class CacheLayer(Protocol):
    def ensure(self, spec: CacheSpec) -> Device:
        """A cache on read over ``spec.upstream``: every block is fetched at most once; the
        returned device is also the origin that snapshots and the relay read. One in place
        of another size is a ``Conflict``."""
        ...

    def inspect(self, image: str) -> Device | None:
        """The origin, if the image's cache is complete."""
        ...

    def teardown(self, image: str, *, keep_file: bool = False) -> None:
        """Remove the cache; ``keep_file``: leave its file for a rebuild to reuse (a repair
        of a degraded image; the ``dm`` driver's cache set is shared and has none)."""
        ...

    def list_owned(self) -> list[str]: ...


class RelayLayer(Protocol):
    def ensure(self, spec: RelaySpec) -> Relay:
        """Export ``spec.origin`` read-only under ``spec.iqn`` (LUN 1), with CHAP when
        configured. A target of that IQN exporting something else is a ``Conflict``."""
        ...

    def inspect(self, image: str) -> Relay | None:
        """The image's relay as exported now (found by the image)."""
        ...

    def readers(self, image: str, iqn: str) -> int:
        """How many children read from the relay now."""
        ...

    def teardown(self, image: str, iqn: str | None = None, *, force: bool = False) -> None:
        """Remove the image's relay (found by the image when ``iqn`` is None); ``force``:
        even with readers connected (they are cut off)."""
        ...

    def list_owned(self) -> list[str]: ...


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

    def halt(self) -> None:
        """The host goes down: stop the node's daemons whatever they still serve (run by
        ``virtman-halt``, in a process of its own, after virtmanserver has exited)."""
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
