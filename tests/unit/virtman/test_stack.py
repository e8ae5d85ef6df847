"""The one stack definition: build order, undo on a failure at each step, teardown."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from virtman import stack
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
from virtman.stack import IMAGE_LAYERS, Built, ImageStack, Layer, TeardownFailed

pytestmark = pytest.mark.unit

EP = Endpoint("10.0.0.1:3260", "iqn.2010-10.org.openstack:img")
IQN = "iqn.2010-10.org.openstack:img"


class Recorder:
    """A driver whose layers record every call (in one list, in order) and keep what
    exists, so that idempotence and leftovers can be checked."""

    name = "recorder"

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail  # "ensure <layer>" or "teardown <layer>" raises
        self.built: set[str] = set()  # "<layer>:<image>" in place now
        self.cache_files: set[str] = set()
        self.upstream = _Layer(self, "upstream")
        self.cache = _Layer(self, "cache")
        self.relay = _Layer(self, "relay")
        self.snapshot = _Snapshot(self)

    def step(self, what: str, layer: str, name: str, *extra: str) -> None:
        self.calls.append((what, layer, name, *extra))
        if self.fail == f"{what} {layer}":
            raise RuntimeError(f"{layer} broke")

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def halt(self) -> None: ...

    def revive(self) -> Revived:
        return Revived()

    def images(self) -> set[str]:
        return {b.partition(":")[2] for b in self.built if not b.startswith("snapshot:")}

    def sweep(self, keep: set[str]) -> None: ...

    def origin(self, image: str) -> Device | None:
        return None


class _Snapshot:
    def __init__(self, d: Recorder) -> None:
        self.d = d

    def ensure(self, spec: SnapshotSpec) -> Device:
        self.d.built.add(f"snapshot:{spec.instance}")
        self.d.step("ensure", "snapshot", spec.instance)
        return Device(spec.instance, f"/disks/{spec.instance}", spec.origin.size)

    def teardown(self, instance: str) -> None:
        self.d.step("teardown", "snapshot", instance)
        self.d.built.discard(f"snapshot:{instance}")

    def list_owned(self) -> list[str]:
        return sorted(b.partition(":")[2] for b in self.d.built if b.startswith("snapshot:"))


class _Layer:
    def __init__(self, d: Recorder, layer: str) -> None:
        self.d = d
        self.layer = layer

    def _ensure(self, name: str) -> None:
        self.d.built.add(f"{self.layer}:{name}")  # a failing step may leave parts
        self.d.step("ensure", self.layer, name)

    def ensure(self, spec: UpstreamSpec | CacheSpec | RelaySpec) -> Device:
        name = spec.image
        if isinstance(spec, RelaySpec):
            self._ensure(name)
            return Relay(
                name=name, path="", size=1 << 20, iqn=spec.iqn, portal="10.0.0.9:3260", nbd=None
            )
        self._ensure(name)
        if self.layer == "cache":
            self.d.cache_files.add(name)
        return Device(f"{self.layer}-{name}", f"/dev/{self.layer}-{name}", 1 << 20)

    def teardown(self, name: str, iqn: str | None = None, **kw: bool) -> None:
        extra = [f"{k}={v}" for k, v in sorted(kw.items())]
        if self.layer == "relay":
            extra.insert(0, f"iqn={iqn}")
        self.d.step("teardown", self.layer, name, *extra)
        self.d.built.discard(f"{self.layer}:{name}")
        if self.layer == "cache" and not kw.get("keep_file"):
            self.d.cache_files.discard(name)

    def inspect(self, name: str) -> Device | None:
        return None

    def list_owned(self) -> list[str]:
        prefix = f"{self.layer}:"
        return sorted(b.partition(":")[2] for b in self.d.built if b.startswith(prefix))

    def endpoints(self, image: str) -> list[Endpoint]:
        return []

    def readers(self, image: str, iqn: str) -> int:
        return 0


def image_stack(driver: Recorder, *, export: bool = True) -> ImageStack:
    return ImageStack(driver, "img", iqn=IQN, export=export)  # type: ignore[arg-type]


def ensures(driver: Recorder) -> list[str]:
    return [c[1] for c in driver.calls if c[0] == "ensure"]


def teardowns(driver: Recorder) -> list[str]:
    return [c[1] for c in driver.calls if c[0] == "teardown"]


def test_the_order_is_defined_once_bottom_to_top() -> None:
    assert IMAGE_LAYERS == (Layer.UPSTREAM, Layer.CACHE, Layer.RELAY)


def test_build_goes_up_and_hands_each_layer_the_one_below() -> None:
    driver = Recorder()
    seen: list[Built] = []
    built = image_stack(driver).build([EP], then=seen.append)
    assert ensures(driver) == ["upstream", "cache", "relay"]
    assert built.upstream.name == "upstream-img" and built.origin.name == "cache-img"
    assert built.relay is not None and built.relay.iqn == IQN
    assert seen == [built]  # ``then`` runs after the last layer
    assert driver.built == {"upstream:img", "cache:img", "relay:img"}


def test_an_image_served_here_has_no_relay() -> None:
    driver = Recorder()
    built = image_stack(driver, export=False).build([EP])
    assert ensures(driver) == ["upstream", "cache"] and built.relay is None
    image_stack(driver, export=False).teardown()
    # the image server's own target (same IQN) is never touched
    assert teardowns(driver) == ["cache", "upstream"]


@pytest.mark.parametrize(
    ("failing", "undone"),
    [
        ("upstream", ["upstream"]),
        ("cache", ["cache", "upstream"]),
        ("relay", ["relay", "cache", "upstream"]),
    ],
)
def test_a_failure_at_each_step_undoes_the_steps_armed_top_first(
    failing: str, undone: list[str]
) -> None:
    driver = Recorder(fail=f"ensure {failing}")
    with pytest.raises(RuntimeError, match=f"{failing} broke"):
        image_stack(driver).build([EP])
    assert ensures(driver) == list(IMAGE_LAYERS[: IMAGE_LAYERS.index(Layer(failing)) + 1])
    assert teardowns(driver) == undone
    assert driver.built == set() and driver.cache_files == set()  # nothing left behind


def test_a_failure_after_the_layers_undoes_them_all() -> None:
    driver = Recorder()

    def register(built: Built) -> None:
        raise RuntimeError("Volt said no")

    with pytest.raises(RuntimeError, match="Volt said no"):
        image_stack(driver).build([EP], then=register, keep_cache_file=True)
    assert teardowns(driver) == ["relay", "cache", "upstream"]
    assert driver.built == set() and driver.cache_files == {"img"}  # kept for a repair


def test_undo_goes_on_past_a_failing_teardown() -> None:
    driver = Recorder(fail="ensure relay")
    driver.upstream.teardown = _failing(driver.upstream.teardown)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="relay broke"):  # the build's error, not the undo's
        image_stack(driver).build([EP])
    assert teardowns(driver) == ["relay", "cache", "upstream"]


def _failing(teardown: Callable[..., None]) -> Callable[..., None]:
    def wrapped(name: str, *args: object, **kw: bool) -> None:
        teardown(name, *args, **kw)
        raise RuntimeError("teardown broke")

    return wrapped


def test_without_undo_the_built_layers_stay() -> None:
    driver = Recorder(fail="ensure relay")
    with pytest.raises(RuntimeError):
        image_stack(driver).build([EP], undo=False)
    assert teardowns(driver) == [] and driver.built == {"upstream:img", "cache:img", "relay:img"}


def test_teardown_goes_down_and_is_idempotent() -> None:
    driver = Recorder()
    image_stack(driver).build([EP])
    driver.calls.clear()
    image_stack(driver).teardown(force=True)
    assert driver.calls == [
        ("teardown", "relay", "img", f"iqn={IQN}", "force=True"),
        ("teardown", "cache", "img", "keep_file=False"),
        ("teardown", "upstream", "img"),
    ]
    assert driver.built == set()
    image_stack(driver).teardown()  # again: nothing there, no error
    image_stack(driver).teardown()
    assert teardowns(driver) == ["relay", "cache", "upstream"] * 3


def test_teardown_above_a_layer_keeps_the_ones_below() -> None:
    driver = Recorder()
    image_stack(driver).build([EP])
    driver.calls.clear()
    image_stack(driver).teardown(above=Layer.UPSTREAM, keep_cache_file=True)
    assert teardowns(driver) == ["relay", "cache"]
    assert driver.built == {"upstream:img"} and driver.cache_files == {"img"}


def test_teardown_tries_every_layer_then_reports_the_failures() -> None:
    driver = Recorder(fail="teardown cache")
    image_stack(driver).build([EP])
    with pytest.raises(TeardownFailed) as err:
        image_stack(driver).teardown()
    assert teardowns(driver) == ["relay", "cache", "upstream"]
    assert [layer for layer, _ in err.value.failed] == [Layer.CACHE]
    image_stack(driver).teardown(check=False)  # only logged


def test_sweep_tears_down_strays_found_by_image_even_with_readers() -> None:
    driver = Recorder()
    for image in ("b", "a"):
        ImageStack(driver, image, iqn=IQN).build([EP])  # type: ignore[arg-type]
    driver.calls.clear()
    stack.sweep(driver, {"a", "b"})  # type: ignore[arg-type]
    assert driver.calls == [
        ("teardown", "relay", "a", "iqn=None", "force=True"),
        ("teardown", "cache", "a", "keep_file=False"),
        ("teardown", "upstream", "a"),
        ("teardown", "relay", "b", "iqn=None", "force=True"),
        ("teardown", "cache", "b", "keep_file=False"),
        ("teardown", "upstream", "b"),
    ]
    assert driver.images() == set()


def test_the_disk_is_the_step_on_top_of_the_origin() -> None:
    driver = Recorder()
    origin = image_stack(driver).build([EP]).origin
    disk = stack.create_disk(driver, "vm1", origin)  # type: ignore[arg-type]
    assert disk.path == "/disks/vm1" and disk.size == origin.size
    assert driver.snapshot.list_owned() == ["vm1"]
    stack.remove_disk(driver, "vm1")  # type: ignore[arg-type]
    stack.remove_disk(driver, "vm1")  # type: ignore[arg-type]
    assert driver.snapshot.list_owned() == []
