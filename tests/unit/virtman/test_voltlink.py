"""VoltLink.join: retries "not placeable" and an unreachable Volt with backoff until its
deadline, and a stop (virtman shutting down) ends a waiting join at once."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import pytest

from virtman.errors import ParentsUnavailable
from virtman.layers.base import Relay
from virtman.voltlink import VoltLink
from voltclient.client import Volume
from voltclient.exceptions import ConnectionFailed, VoltClientError

pytestmark = pytest.mark.unit

PARENT = Volume(host="10.0.0.2", port="3260", iqn="iqn.x:volume-img", lun="1", peer_id="p")


class FakeVolumes:
    """Answers ``get`` from a script: a tuple is returned, an exception raised."""

    def __init__(self, answers: list[Any], default: Any = (None, [])) -> None:
        self.answers = answers
        self.default = default
        self.calls = 0
        self.called = threading.Event()

    def get(self, image: str, host: str) -> tuple[str | None, list[Volume]]:
        self.calls += 1
        self.called.set()
        answer = self.answers.pop(0) if self.answers else self.default
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeClient:
    def __init__(self, volumes: FakeVolumes) -> None:
        self.volumes = volumes


def link(volumes: FakeVolumes, stop: threading.Event | None = None) -> VoltLink:
    volt = VoltLink("http://127.0.0.1:9", None, "10.0.0.5", stop=stop)
    volt.client = FakeClient(volumes)
    return volt


def test_join_retries_until_placed() -> None:
    volumes = FakeVolumes([(None, []), ConnectionFailed("down"), ("peer-1", [PARENT])])
    assert link(volumes).join("volume-img", timeout_s=30) == ("peer-1", [PARENT])
    assert volumes.calls == 3


def test_join_gives_up_at_its_deadline() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # every look at the clock: one second later
        return now[0]

    volumes = FakeVolumes([])
    with pytest.raises(ParentsUnavailable, match="within 5 s"):
        link(volumes).join("volume-img", timeout_s=5, clock=clock)
    assert volumes.calls >= 2


def test_a_quiet_join_ends_at_once_when_volt_is_unreachable() -> None:
    volumes = FakeVolumes([], default=ConnectionFailed("down"))
    with pytest.raises(ParentsUnavailable, match="Volt unreachable"):
        link(volumes).join("volume-img", timeout_s=600, quiet=True)
    assert volumes.calls == 1


def test_a_stop_wakes_a_waiting_join() -> None:
    stop = threading.Event()
    volumes = FakeVolumes([])  # never placeable: the join waits up to 600 s
    errors: list[BaseException] = []

    def run(join: Callable[[], object]) -> None:
        try:
            join()
        except BaseException as exc:
            errors.append(exc)

    volt = link(volumes, stop)
    thread = threading.Thread(target=run, args=(lambda: volt.join("volume-img", timeout_s=600),))
    started = time.monotonic()
    thread.start()
    assert volumes.called.wait(10)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert len(errors) == 1 and isinstance(errors[0], ParentsUnavailable)
    assert "virtman is stopping" in str(errors[0])


class FakeLogins:
    """``login_with_parents`` answering from a script (a tuple, or an exception raised)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.seen: list[tuple[Any, ...]] = []

    def login_with_parents(self, *args: Any, place: bool = False) -> Any:
        self.seen.append((*args, place))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    ("error", "falls_back"),
    [
        (VoltClientError(409, "volt.peer.not_placeable", "cannot be placed yet"), True),
        (VoltClientError(400, "volt.invalid_input", "place: unknown field; allowed: host"), True),
        (VoltClientError(503, "volt.store.unavailable", "store write failed"), False),
    ],
)
def test_place_and_register_falls_back_only_when_volt_cannot_place(error, falls_back) -> None:
    relay = Relay(name="r", path="/dev/r", size=1, iqn="iqn.x:volume-img",
                  portal="10.0.0.5:3260", nbd="10.0.0.5:10809")  # fmt: skip
    logins = FakeLogins((Volume(peer_id="10.0.0.5:volume-img"), [PARENT]))
    volt = link(FakeVolumes([]))
    volt.client = FakeClient(logins)  # type: ignore[arg-type]
    assert volt.place_and_register("volume-img", relay) == ("10.0.0.5:volume-img", [PARENT])
    assert logins.seen == [
        ("volume-img", "10.0.0.5:volume-img", "10.0.0.5", 3260, "iqn.x:volume-img", 1, 10809,
         True)
    ]  # fmt: skip
    logins.answer = error
    if falls_back:
        assert volt.place_and_register("volume-img", relay) is None
    else:
        with pytest.raises(VoltClientError):
            volt.place_and_register("volume-img", relay)


class FakeMembers:
    """``members.heartbeat`` of a Volt that refuses ``bytes_read`` (400), as one without
    the extension does; records what each call sent."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def heartbeat(self, host: str, bytes_read: object = None) -> list[dict[str, Any]]:
        self.sent.append(bytes_read)
        if bytes_read is not None:
            raise VoltClientError(400, "volt.invalid_input", "invalid 'bytes_read': unknown field")
        return [{"peer_id": "10.0.0.5:volume-img", "parents": [PARENT]}]


def test_a_volt_that_refuses_read_counters_gets_heartbeats_without_them() -> None:
    volt = VoltLink("http://127.0.0.1:9", None, "10.0.0.5")
    members = FakeMembers()
    volt.client = type("C", (), {"members": members})()  # type: ignore[assignment]
    counters = [{"peer_id": "10.0.0.5:volume-img", "source": None, "bytes": 1}]
    assert volt.heartbeat(counters) == {"10.0.0.5:volume-img": [PARENT]}
    assert volt.heartbeat(counters) == {"10.0.0.5:volume-img": [PARENT]}
    assert members.sent == [counters, None, None]  # refused once, then never sent again


class ExtensionMembers:
    """``members.heartbeat`` of a Volt that knows ``bytes_read`` but not ``api_port`` (400
    naming it, its allowed fields listed as volt-api does); records what each call sent."""

    def __init__(self, refuse: tuple[str, ...]) -> None:
        self.refuse = refuse
        self.sent: list[dict[str, object]] = []

    def heartbeat(
        self, host: str, bytes_read: object = None, api_port: int | None = None
    ) -> list[dict[str, Any]]:
        sent = {"bytes_read": bytes_read, "api_port": api_port}
        self.sent.append(sent)
        for field in self.refuse:
            if sent[field] is not None:
                detail = f"invalid {field!r}: unknown field; allowed: bytes_read, host"
                raise VoltClientError(400, "volt.invalid_input", detail)
        return [{"peer_id": "10.0.0.5:volume-img", "parents": [PARENT]}]


@pytest.mark.parametrize("refuse", [(), ("api_port",), ("bytes_read", "api_port")])
def test_the_node_daemons_port_goes_with_every_heartbeat_unless_refused(refuse) -> None:
    volt = VoltLink("http://127.0.0.1:9", None, "10.0.0.5", api_port=7774)
    members = ExtensionMembers(refuse)
    volt.client = type("C", (), {"members": members})()  # type: ignore[assignment]
    counters = [{"peer_id": "10.0.0.5:volume-img", "source": None, "bytes": 1}]
    assert volt.heartbeat(counters) == {"10.0.0.5:volume-img": [PARENT]}
    assert volt.heartbeat(counters) == {"10.0.0.5:volume-img": [PARENT]}
    counted = None if "bytes_read" in refuse else counters
    port = None if "api_port" in refuse else 7774
    # a refusal names its own field (the allowed list naming bytes_read is no refusal of it):
    # that field alone is dropped, once, and never sent again
    assert members.sent[-2:] == [{"bytes_read": counted, "api_port": port}] * 2
    assert len(members.sent) == 2 + len(refuse)
    assert volt.api_port == port and volt.counters_refused == ("bytes_read" in refuse)


def test_a_heartbeat_refused_for_another_reason_is_raised() -> None:
    volt = VoltLink("http://127.0.0.1:9", None, "10.0.0.5", api_port=7774)

    class Refusing:
        def heartbeat(self, host: str, bytes_read: object = None, api_port: object = None) -> None:
            raise VoltClientError(400, "volt.invalid_input", "invalid 'host': must be an address")

    volt.client = type("C", (), {"members": Refusing()})()  # type: ignore[assignment]
    with pytest.raises(VoltClientError):
        volt.heartbeat([])
    assert volt.api_port == 7774 and not volt.counters_refused


class _Volt(BaseHTTPRequestHandler):
    """A Volt that answers a heartbeat and a placing registration, noting the client port
    (the connection) of each request."""

    protocol_version = "HTTP/1.1"  # keep-alive, as Granian
    seen: list[tuple[str, int]] = []

    def _answer(self, body: object) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.seen.append((self.command, self.client_address[1]))
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        self._answer([])

    def do_POST(self) -> None:
        peer_id = unquote(self.path.rsplit("/", 1)[-1])
        self._answer({"peer_id": peer_id, "host": "10.0.0.5", "port": "3260",
                      "iqn": "iqn.x:img", "lun": "1", "status": "OK", "parents": []})  # fmt: skip

    def log_message(self, *args: object) -> None:
        pass


def test_a_burst_registration_rides_the_connection_the_heartbeat_opened() -> None:
    """A node's placing registration goes over the keep-alive connection its heartbeats
    hold (one VoltLink, one session, for both): a burst costs Volt no new connections,
    which is what the simulation's Volt cost per request assumes (docs/benchmarks.rst)."""
    _Volt.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Volt)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        volt = VoltLink(f"http://127.0.0.1:{server.server_port}", "t", "10.0.0.5")
        assert volt.heartbeat() == {}
        relay = Relay(name="r", path="/dev/r", size=1, iqn="iqn.x:img", portal="10.0.0.5:3260",
                      nbd=None)  # fmt: skip
        placed = volt.place_and_register("img", relay)
        assert placed == ("10.0.0.5:img", [])
        assert volt.heartbeat() == {}
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert [command for command, _ in _Volt.seen] == ["PUT", "POST", "PUT"]
    assert len({port for _, port in _Volt.seen}) == 1  # one connection for all three
