"""The one definition of an image's block stack: which layers, in which order.

Bottom to top, per image: ``upstream`` (paths to parents or image servers behind one
device), ``cache`` (cache on read; its device is the origin), ``relay`` (the origin exported
to children; not for an image this node serves itself). Per VM, on top of the origin: the
``snapshot`` (the VM's copy-on-write disk).

Everything that walks the stack derives its order from ``IMAGE_LAYERS``: ``build`` goes
up (each layer's undo armed before its step, a failure undoes the steps done, top first),
``teardown`` and the drivers' sweep of strays go down. Every layer's teardown is
idempotent, so a teardown of a half-built stack is safe.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from virtman.layers.base import (
    CacheLayer,
    CacheSpec,
    Device,
    Driver,
    Endpoint,
    Relay,
    RelayLayer,
    RelaySpec,
    SnapshotSpec,
    UpstreamLayer,
    UpstreamSpec,
)

LOG = logging.getLogger(__name__)


class Layer(enum.StrEnum):
    UPSTREAM = "upstream"
    CACHE = "cache"
    RELAY = "relay"
    SNAPSHOT = "snapshot"


IMAGE_LAYERS: tuple[Layer, ...] = (Layer.UPSTREAM, Layer.CACHE, Layer.RELAY)
"""An image's layers, bottom to top; the snapshot (per VM) sits on the top one's origin."""


@dataclass(frozen=True)
class Built:
    """What a build made: the upstream device, the origin (the cache's device) and the
    relay (None for an image this node serves itself)."""

    upstream: Device
    origin: Device
    relay: Relay | None


class TeardownFailed(Exception):
    """Some layers could not be torn down (each was tried; the first error is the cause)."""

    def __init__(self, image: str, failed: Sequence[tuple[Layer, Exception]]) -> None:
        self.image = image
        self.failed = list(failed)
        what = ", ".join(f"{layer}: {exc}" for layer, exc in failed)
        super().__init__(f"{image}: teardown failed ({what})")


class ImageStack:
    """One image's stack on ``driver``. ``iqn``: the relay's target name (None: a teardown
    finds the relay by the image); ``export``: the image has a relay (False for an image
    this node serves itself, whose IQN names the image server's own target)."""

    def __init__(
        self, driver: Driver, image: str, *, iqn: str | None = None, export: bool = True
    ) -> None:
        self.driver = driver
        self.image = image
        self.iqn = iqn
        self.export = export

    @property
    def layers(self) -> tuple[Layer, ...]:
        """This stack's layers, bottom to top."""
        return IMAGE_LAYERS if self.export else IMAGE_LAYERS[:-1]

    def build(
        self,
        endpoints: Sequence[Endpoint],
        *,
        keep_cache_file: bool = False,
        then: Callable[[Built], None] | None = None,
        undo: bool = True,
    ) -> Built:
        """Create or adopt every layer, bottom up, then run ``then`` (e.g. register the
        relay). On any failure the layers are undone top first (``keep_cache_file``: the
        cache's file stays for the next attempt) and the error is raised; ``undo=False``
        leaves what was built for the caller."""
        armed: list[Layer] = []
        upstream: Device | None = None
        origin: Device | None = None
        relay: Relay | None = None
        try:
            for layer in self.layers:
                armed.append(layer)  # armed before its step: a half-done step leaves parts
                if layer is Layer.UPSTREAM:
                    upstream = self.driver.upstream.ensure(
                        UpstreamSpec(self.image, tuple(endpoints))
                    )
                elif layer is Layer.CACHE:
                    assert upstream is not None
                    origin = self.driver.cache.ensure(CacheSpec(self.image, upstream))
                elif layer is Layer.RELAY:
                    assert origin is not None and self.iqn is not None
                    relay = self.driver.relay.ensure(RelaySpec(self.image, self.iqn, origin))
            assert upstream is not None and origin is not None
            built = Built(upstream, origin, relay)
            if then is not None:
                then(built)
            return built
        except BaseException:
            if undo:
                self._down(reversed(armed), keep_cache_file=keep_cache_file, force=False)
            raise

    def teardown(
        self,
        *,
        keep_cache_file: bool = False,
        force: bool = False,
        above: Layer | None = None,
        check: bool = True,
    ) -> None:
        """Tear the layers down, top first; every layer is tried even if one fails.
        ``above``: only the layers above that one; ``force``: the relay goes even with
        readers connected; ``check``: raise ``TeardownFailed`` if a layer failed (else the
        failures are only logged)."""
        layers = self.layers
        if above is not None:
            layers = layers[layers.index(above) + 1 :]
        failed = self._down(reversed(layers), keep_cache_file=keep_cache_file, force=force)
        if failed and check:
            raise TeardownFailed(self.image, failed) from failed[0][1]

    def _down(
        self, layers: Iterable[Layer], *, keep_cache_file: bool, force: bool
    ) -> list[tuple[Layer, Exception]]:
        failed: list[tuple[Layer, Exception]] = []
        for layer in layers:
            try:
                if layer is Layer.RELAY:
                    self.driver.relay.teardown(self.image, self.iqn, force=force)
                elif layer is Layer.CACHE:
                    self.driver.cache.teardown(self.image, keep_file=keep_cache_file)
                elif layer is Layer.UPSTREAM:
                    self.driver.upstream.teardown(self.image)
            except Exception as exc:  # keep tearing down the rest
                LOG.error("%s: teardown of the %s failed: %s", self.image, layer, exc)
                failed.append((layer, exc))
        return failed


def images(driver: Driver) -> set[str]:
    """Images that have anything of any layer of an image's stack on this node now."""
    found: set[str] = set()
    for layer in IMAGE_LAYERS:
        found |= set(_layer(driver, layer).list_owned())
    return found


def _layer(driver: Driver, layer: Layer) -> UpstreamLayer | CacheLayer | RelayLayer:
    if layer is Layer.UPSTREAM:
        return driver.upstream
    if layer is Layer.CACHE:
        return driver.cache
    assert layer is Layer.RELAY
    return driver.relay


def sweep(driver: Driver, images: set[str]) -> None:
    """Tear down the stacks of ``images`` (strays: their relay found by the image, even
    with readers); failures are logged and the others still go."""
    for image in sorted(images):
        LOG.warning("removing the stray stack of %s", image)
        ImageStack(driver, image).teardown(force=True, check=False)


def create_disk(driver: Driver, instance: str, origin: Device) -> Device:
    """The top of the stack for one VM: its copy-on-write disk over ``origin`` (an
    identical one in place is adopted; a different one raises ``Conflict``)."""
    return driver.snapshot.ensure(SnapshotSpec(instance, origin))


def remove_disk(driver: Driver, instance: str) -> None:
    """Delete a VM's disk (only an explicit destroy, or a create that failed)."""
    driver.snapshot.teardown(instance)
