"""The layer contract, the same cases for every driver (virtman/layers/base.py).

Run by tests/functional/test_driver_contract.py against the ``qemu`` driver on this host,
and inside a guest of tests/functional/test_dm_guests.py against the ``dm`` driver (this
file is copied to /ci/guestside/ there, so it imports only the product and the stdlib).

``run_all`` starts from a node with nothing of the rig's image or instance on it, builds
the stack once through the layers' own calls, runs every case on it, and tears it down:

- ``ensure_twice_adopts``: a second ensure with the same spec returns the same Device and
  makes nothing new (every layer's list_owned and inspect unchanged)
- ``different_spec_conflicts``: ensure with another spec under the same name raises
  ``Conflict`` (the cache: another size upstream; the snapshot: another origin) and
  changes nothing
- ``inspect_before_and_after``: inspect is None before, the ensured Device after, None
  after teardown
- ``teardown_leaves_nothing``: teardown (twice: idempotent) leaves no object of any layer
- ``list_owned_lists_exactly_ours``: each layer lists exactly the rig's image (instance)
- ``bytes_read_back``: the origin and the VM's disk read back the image's bytes
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from virtman.errors import Conflict
from virtman.layers.base import (
    CacheSpec,
    Device,
    Driver,
    Endpoint,
    Relay,
    RelaySpec,
    SnapshotSpec,
    UpstreamSpec,
)


@dataclass
class Rig:
    """A started driver, an image an image server serves at ``endpoints``, and how to read
    a VM's disk (a block device for ``dm``, a qcow2 file for ``qemu``)."""

    driver: Driver
    image: str
    endpoints: tuple[Endpoint, ...]
    relay_iqn: str
    image_sha: str  # sha256 hex of the image's bytes
    disk_sha: Callable[[Device], str]
    instance: str = "contract-vm"


@dataclass(frozen=True)
class Stack:
    upstream: Device
    origin: Device
    relay: Relay
    disk: Device


def file_sha(path: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def build(rig: Rig) -> Stack:
    d = rig.driver
    upstream = d.upstream.ensure(UpstreamSpec(rig.image, rig.endpoints))
    origin = d.cache.ensure(CacheSpec(rig.image, upstream))
    relay = d.relay.ensure(RelaySpec(rig.image, rig.relay_iqn, origin))
    disk = d.snapshot.ensure(SnapshotSpec(rig.instance, origin))
    return Stack(upstream, origin, relay, disk)


def teardown(rig: Rig) -> None:
    d = rig.driver
    d.snapshot.teardown(rig.instance)
    d.relay.teardown(rig.image, rig.relay_iqn, force=True)
    d.cache.teardown(rig.image)
    d.upstream.teardown(rig.image)


def seen(rig: Rig) -> dict[str, object]:
    """What every layer reports for the rig's names now (inspect and list_owned)."""
    d = rig.driver
    return {
        "upstream": d.upstream.inspect(rig.image),
        "cache": d.cache.inspect(rig.image),
        "relay": d.relay.inspect(rig.image),
        "snapshot": d.snapshot.inspect(rig.instance),
        "owned": owned(rig),
    }


def owned(rig: Rig) -> dict[str, list[str]]:
    d = rig.driver
    return {
        "upstream": d.upstream.list_owned(),
        "cache": d.cache.list_owned(),
        "relay": d.relay.list_owned(),
        "snapshot": d.snapshot.list_owned(),
    }


NOTHING = {"upstream": None, "cache": None, "relay": None, "snapshot": None}


def _nothing_of_ours(rig: Rig) -> None:
    now = seen(rig)
    listed = now.pop("owned")
    assert now == NOTHING, now
    assert isinstance(listed, dict)
    assert all(rig.image not in v and rig.instance not in v for v in listed.values()), listed


def ensure_twice_adopts(rig: Rig, built: Stack) -> None:
    before = seen(rig)
    assert build(rig) == built
    assert seen(rig) == before


def different_spec_conflicts(rig: Rig, built: Stack) -> None:
    before = seen(rig)
    smaller = replace(built.upstream, size=built.upstream.size // 2)
    try:
        rig.driver.cache.ensure(CacheSpec(rig.image, smaller))
    except Conflict as exc:
        assert exc.name == rig.image, exc
    else:
        raise AssertionError("a cache over another upstream size was adopted")
    assert seen(rig) == before
    other = replace(built.origin, size=built.origin.size // 2)
    try:
        rig.driver.snapshot.ensure(SnapshotSpec(rig.instance, other))
    except Conflict as exc:
        assert exc.name == rig.instance, exc
    else:
        raise AssertionError("a disk over another origin was adopted")
    assert seen(rig) == before
    assert rig.disk_sha(built.disk) == rig.image_sha  # the disk is as it was


def inspect_after_build(rig: Rig, built: Stack) -> None:
    now = seen(rig)
    assert now["upstream"] == built.upstream, (now, built)
    assert now["cache"] == built.origin, (now, built)
    assert now["relay"] == built.relay, (now, built)
    assert now["snapshot"] == built.disk, (now, built)


def list_owned_lists_exactly_ours(rig: Rig, built: Stack) -> None:
    assert owned(rig) == {
        "upstream": [rig.image],
        "cache": [rig.image],
        "relay": [rig.image],
        "snapshot": [rig.instance],
    }, owned(rig)
    assert rig.driver.images() == {rig.image}


def bytes_read_back(rig: Rig, built: Stack) -> None:
    assert file_sha(built.origin.path) == rig.image_sha
    assert rig.disk_sha(built.disk) == rig.image_sha


def teardown_leaves_nothing(rig: Rig) -> None:
    teardown(rig)
    _nothing_of_ours(rig)
    teardown(rig)  # already gone: success
    _nothing_of_ours(rig)


ON_A_BUILT_STACK: dict[str, Callable[[Rig, Stack], None]] = {
    f.__name__: f
    for f in (
        ensure_twice_adopts,
        list_owned_lists_exactly_ours,
        bytes_read_back,
        different_spec_conflicts,  # last: it must change nothing the others saw
    )
}
INSPECT = "inspect_before_and_after"  # nothing before, the Devices after, nothing after
TEARDOWN = "teardown_leaves_nothing"
CASES = (*ON_A_BUILT_STACK, INSPECT, TEARDOWN)


def _outcome(check: Callable[[], None]) -> str:
    try:
        check()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def run_all(rig: Rig) -> dict[str, str]:
    """Every case in one pass over one build (a build is what costs, on real kernels):
    case -> "ok" or its error. Starts from nothing of the rig's and leaves nothing."""
    outcome: dict[str, str] = {}
    before = _outcome(lambda: _nothing_of_ours(rig))
    try:
        built = build(rig)
    except Exception as exc:
        teardown(rig)
        return dict.fromkeys(CASES, f"the build failed: {type(exc).__name__}: {exc}")
    after = _outcome(lambda: inspect_after_build(rig, built))
    for name, case in ON_A_BUILT_STACK.items():
        outcome[name] = _outcome(partial(case, rig, built))
    outcome[TEARDOWN] = _outcome(lambda: teardown_leaves_nothing(rig))
    problems = [o for o in (before, after, outcome[TEARDOWN]) if o != "ok"]
    outcome[INSPECT] = "; ".join(problems) or "ok"
    return outcome
