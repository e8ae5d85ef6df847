"""The path of one create request, measured: a line of nodelist.cfg through vmtrun.py,
vmtapi and virtmanclient, over XML-RPC on 127.0.0.1 to virtman's server, Virtman, the image's
stack and the qemu driver, to the first call into brick.qsd (the driver on a fake QMP, see
conftest.py).

How it counts: ``sys.setprofile`` and ``threading.setprofile`` see every Python call of both
sides. The *hops* are the frames of the project's own code (vmtrun, vmtapi, virtmanclient,
virtman, brick) on the stack at two moments: on the client when it first calls into
``xmlrpc.client`` (the request leaves), and in the server's worker when it first calls into
``brick.qsd``; the *modules* are the distinct modules of those frames. Over the whole
request it also counts how often the image name is normalised and how often connection
data changes form (an ``Endpoint`` made, or one turned back into a dict).

Run with ``-s`` to see the figures; the test holds them to what they are now.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import virtman.drivers.qemu.driver as qemu_driver_module
from tests.unit.fakes.volt import FakeVolt
from virtman.compute import Virtman
from virtman.drivers.qemu.driver import QemuDriver
from virtman.layers.base import Endpoint
from virtman.server import Limits, build_server

VMT_DEMO = Path(__file__).resolve().parents[3] / "vmt-demo"
if str(VMT_DEMO) not in sys.path:
    sys.path.insert(0, str(VMT_DEMO))

import vmtapi  # noqa: E402
import vmtrun  # noqa: E402

pytestmark = pytest.mark.unit

OURS = ("vmtrun", "vmtapi", "virtmanclient", "virtman", "brick")
TOKEN = "path-token"
NORMALISERS = {
    ("virtmanclient.validation", "normalise_image_name"),
    ("virtman.validation", "image_name"),
}


def ours(frame: FrameType) -> bool:
    return str(frame.f_globals.get("__name__", "")).split(".")[0] in OURS


def stack_of(frame: FrameType | None) -> list[tuple[str, str]]:
    """(module, function) of our frames on the stack, outermost first."""
    names = []
    while frame is not None:
        if ours(frame):
            names.append((str(frame.f_globals["__name__"]), frame.f_code.co_qualname))
        frame = frame.f_back
    return names[::-1]


def _caller(frame: FrameType | None) -> str:
    """The first frame of ours from ``frame`` outwards (comprehensions skipped)."""
    while frame is not None and (not ours(frame) or frame.f_code.co_name.startswith("<")):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_globals['__name__']}:{frame.f_code.co_qualname}"


def _holds_endpoint(frame: FrameType) -> bool:
    return any(type(v) is Endpoint for v in frame.f_locals.values())


def _as_dicts(value: object) -> bool:
    """A connection dict, or a list of them."""
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(i, dict) and "target_portal" in i for i in items)


@dataclass
class Trace:
    client: list[tuple[str, str]] = field(default_factory=list)  # as the request leaves
    server: list[tuple[str, str]] = field(default_factory=list)  # at the first brick.qsd call
    normalised: int = 0
    endpoints_made: int = 0
    endpoints_as_dicts: int = 0
    where: Counter[str] = field(default_factory=Counter)  # who normalised or converted
    calls: Counter[str] = field(default_factory=Counter)

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "return":
            if ours(frame) and _as_dicts(arg) and _holds_endpoint(frame):
                count = len(arg) if isinstance(arg, list) else 1  # one an Endpoint
                self.endpoints_as_dicts += count
                self.where[f"as dicts: {_caller(frame)}"] += count
            return
        if event != "call":
            return
        module = str(frame.f_globals.get("__name__", ""))
        code = frame.f_code
        if not self.client and module == "xmlrpc.client" and "__request" in code.co_name:
            self.client = stack_of(frame)  # ServerProxy's request: it goes on the wire now
        if not self.server and module.startswith("brick.qsd"):
            self.server = stack_of(frame)
        if (module, code.co_name) in NORMALISERS:
            self.normalised += 1
            self.where[f"normalised: {_caller(frame.f_back)}"] += 1
        if code.co_name == "__init__" and type(frame.f_locals.get("self")) is Endpoint:
            self.endpoints_made += 1
            self.where[f"Endpoint made: {_caller(frame.f_back)}"] += 1
        if (module, code.co_name) == ("dataclasses", "asdict") and _holds_endpoint(frame):
            self.endpoints_as_dicts += 1
            self.where[f"as dicts: {_caller(frame)}"] += 1
        if ours(frame):
            self.calls[module] += 1

    def hops(self) -> int:
        return len(self.client) + len(self.server)

    def modules(self) -> set[str]:
        return {module for module, _ in self.client + self.server}


@pytest.fixture
def create_traced(
    qemu_driver: QemuDriver, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Callable[[int], str]], tuple[Trace, str]]]:
    """Runs ``send(port)`` (a create sent to a virtman server on that port: Virtman on the
    qemu driver, Volt faked) under the tracer; returns the trace and the result."""

    def qemu_img(argv: list[str], **kw: object) -> None:
        Path(argv[-1]).touch()  # the VM's overlay

    monkeypatch.setattr(qemu_driver_module, "execute", qemu_img)
    volt = FakeVolt(qemu_driver.host)
    node = Virtman(settings=qemu_driver.settings, driver=qemu_driver, volt=volt, heartbeat=False)
    servers: list[Any] = []

    def run(send: Callable[[int], str]) -> tuple[Trace, str]:
        trace = Trace()
        threading.setprofile(trace.profile)  # the server's workers start below
        sys.setprofile(trace.profile)
        try:
            server = build_server(("127.0.0.1", 0), Limits(token=TOKEN), node, None)  # type: ignore[arg-type]
            servers.append(server)
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            result = send(server.server_address[1])
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
        return trace, result

    yield run
    for server in servers:
        server.shutdown()
        server.server_close()
    node.close()


def report(title: str, trace: Trace) -> None:
    print(f"\n{title}")
    print(
        f"  client stack ({len(trace.client)}): " + " -> ".join(f"{m}:{f}" for m, f in trace.client)
    )
    print(
        f"  server stack ({len(trace.server)}): " + " -> ".join(f"{m}:{f}" for m, f in trace.server)
    )
    print(f"  hops {trace.hops()}, modules {len(trace.modules())}: {sorted(trace.modules())}")
    print(
        f"  image name normalised {trace.normalised}x; Endpoints made "
        f"{trace.endpoints_made}, turned back into dicts {trace.endpoints_as_dicts}"
    )
    for what, count in sorted(trace.where.items()):
        print(f"    {count}x {what}")


def test_one_create_from_vmtrun_to_brick(
    qemu_driver: QemuDriver,
    create_traced: Callable[[Callable[[int], str]], tuple[Trace, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    def send(port: int) -> str:
        [action] = vmtrun.parse_nodelist("+ 127.0.0.1 vm1 10.0.0.1 img\n")
        return vmtrun.executor(port=port, token=TOKEN, timeout=10)(action)

    trace, result = create_traced(send)
    assert result == f"0:{qemu_driver.settings.instances_dir}/vm1.qcow2"
    with capsys.disabled():
        report("one create, vmtrun.py -> the first brick.qsd call", trace)
    assert trace.client[0][0] == "vmtrun" and trace.server[-1][0].startswith("brick.qsd")
    # what it is now (one hop is virtman.server.Dispatcher, which gives a missing guest its
    # typed fault); before build_connections and the journal record were trimmed: 14 hops,
    # 9 modules, the name normalised 4 times, Endpoints turned back into dicts 3 times
    assert (trace.hops(), len(trace.modules())) == (15, 9)
    assert trace.normalised == 4  # vmtrun's check, vmtapi, build_connections; the server
    assert trace.endpoints_made == 1  # at the server's boundary, from the wire's dicts
    assert trace.endpoints_as_dicts == 2  # the journal's form (once an image), the paths file


def test_several_image_servers_normalise_the_name_no_more_often(
    create_traced: Callable[[Callable[[int], str]], tuple[Trace, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    servers = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    trace, result = create_traced(
        lambda port: vmtapi.create("127.0.0.1", "vm1", "img", servers, port=port, token=TOKEN)
    )
    assert result.startswith("0:")
    with capsys.disabled():
        report("one create with three image servers, vmtapi -> the first brick.qsd call", trace)
    # before: 5 (build_connection once a server) and 9 (the journal's form at each record)
    assert trace.normalised == 3  # vmtapi, build_connections (once for all), the server
    assert trace.endpoints_made == 3  # one a path, at the server's boundary
    assert trace.endpoints_as_dicts == 6  # the journal's form (once an image), the paths file
