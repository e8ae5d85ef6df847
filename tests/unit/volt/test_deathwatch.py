"""A child's report of a dead parent (volt/deathwatch.py): who may report what, the check
before any eviction, the eviction itself (as the evictor's, pushed at once), and many
reports of one death making one eviction."""

from __future__ import annotations

import threading

import pytest

from brick import bus
from brick.wait import wait_until
from tests.unit.fakes.clock import Clock
from tests.unit.volt.invariants import check_tree
from tests.unit.volt.test_bus import IMAGE, Recorder, make_service, node, parents_now, transports
from virtman.bus import NodeBus
from volt.api.handlers import Handlers
from volt.api.request import Request
from volt.auth import ADMIN, Credential
from volt.bus import VoltBus, parse_dead_parent
from volt.deathwatch import DeathWatch, Report
from volt.errors import Forbidden, InvalidInput, MalformedBody, PeerNotFound

pytestmark = pytest.mark.unit
__all__ = ["transports"]  # the fixture, shared with test_bus

A, A2, B = "10.0.0.1", "10.0.0.2", "10.0.0.3"


class Probe:
    """A fake TCP check: the hosts in ``alive`` accept; calls are recorded."""

    def __init__(self, *alive: str) -> None:
        self.alive = set(alive)
        self.calls: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, host: str, port: int, timeout_s: float) -> bool:
        self.gate.wait(10)
        self.calls.append((host, port))
        return host in self.alive


@pytest.fixture
def tree(tmp_path):
    """root → A, A2; A → B, all registered (iSCSI 3260; A also NBD 10809)."""
    clock = Clock()
    service = make_service(tmp_path, clock)
    a = service.query(IMAGE, A).node
    assert a is not None and a.peer_id is not None
    service.register(IMAGE, a.peer_id, A, "3260", "iqn.x:volume-image1", "1", nbd_port="10809")
    a2, b = node(service, A2), node(service, B)
    pushed = Recorder()
    service.on_parents_changed = pushed
    return service, clock, pushed, (a.peer_id, a2, b)


def wait_counted(watch: DeathWatch, what: str, n: int = 1) -> None:
    wait_until(lambda: watch.counts[what] >= n, timeout_s=10, what=f"{n} {what}")


def test_a_confirmed_report_evicts_the_parent_and_pushes_the_child(tree):
    service, clock, pushed, (a, _a2, b) = tree
    probe = Probe()
    watch = DeathWatch(service, probe=probe, clock=clock)
    assert watch.report(Report(IMAGE, b, a, "api")) == "checking"
    wait_counted(watch, "evicted")
    assert probe.calls == [(A, 10809)]  # the port B reads A from: NBD
    assert a not in service.trees[IMAGE].nodes and A not in service.members
    check_tree(service.trees[IMAGE], service.executor, depth_bound=True)
    assert pushed.hosts() == {B}  # only the dead parent's child, at once
    (entry,) = pushed.calls[0][B]
    assert entry["peer_id"] == b and a not in [p["peer_id"] for p in entry["parents"]]
    assert entry["parents"] == parents_now(service, B)
    watch.stop()


def test_a_parent_that_answers_stays(tree):
    service, clock, pushed, (a, _a2, b) = tree
    probe = Probe(A)
    watch = DeathWatch(service, probe=probe, clock=clock)
    assert watch.report(Report(IMAGE, b, a, "bus")) == "checking"
    wait_counted(watch, "alive")
    assert a in service.trees[IMAGE].nodes and pushed.calls == []
    # found alive just now: the next reports are answered without a check...
    assert watch.report(Report(IMAGE, b, a, "bus")) == "alive"
    assert len(probe.calls) == 1
    # ...until the hold is over: then checked again, and this time it is dead
    clock.now += 2.5
    probe.alive.clear()
    assert watch.report(Report(IMAGE, b, a, "bus")) == "checking"
    wait_counted(watch, "evicted")
    assert len(probe.calls) == 2 and a not in service.trees[IMAGE].nodes
    watch.stop()


def test_many_reports_of_one_death_make_one_check_and_one_eviction(tree):
    service, clock, pushed, (a, _a2, b) = tree
    probe = Probe()
    probe.gate.clear()  # the first check waits: the next reports arrive meanwhile
    watch = DeathWatch(service, probe=probe, clock=clock)
    answers = [watch.report(Report(IMAGE, b, a, "bus")) for _ in range(20)]
    assert answers == ["checking"] * 20 and watch.counts["folded"] == 19
    probe.gate.set()
    wait_counted(watch, "evicted")
    assert len(probe.calls) == 1 and service.metrics.evictions._value.get() == 1
    # later reports (a REST one after the bus's) find the parent gone: nothing more
    assert watch.report(Report(IMAGE, b, a, "api")) == "gone"
    assert service.evict_member(A, "again") is False
    assert len(pushed.calls) == 1
    watch.stop()


def test_only_a_parents_own_child_may_report_it(tree):
    service, clock, _pushed, (a, a2, b) = tree
    watch = DeathWatch(service, probe=Probe(), clock=clock)
    with pytest.raises(InvalidInput) as err:  # A2 is not B's parent
        watch.report(Report(IMAGE, b, a2, "api"))
    assert err.value.field == "parent"
    with pytest.raises(PeerNotFound):  # 10.0.0.9 holds no node of the image
        watch.report(Report(IMAGE, f"10.0.0.9:{IMAGE}", a, "api"))
    with pytest.raises(InvalidInput):  # a child is not its parent's parent
        watch.report(Report(IMAGE, a, b, "api"))
    assert watch.counts == {} and len(service.trees[IMAGE]) == 3


# -- the REST API --------------------------------------------------------------------------
def post(handlers: Handlers, peer: str, body: object, credential: Credential) -> int:
    req = Request(
        "POST",
        f"/v1/volumes/{IMAGE}/{peer}/dead-parent",
        {"volume_id": IMAGE, "peer_id": peer},
        B,
        {},
        body=body,
        credential=credential,
    )
    response = handlers.dead_parent(req)
    assert response.body["result"] in ("checking", "alive", "gone")
    return response.status


def test_the_rest_report_checks_who_reports_and_what(tree):
    service, clock, _pushed, (a, a2, b) = tree
    probe = Probe(A)  # alive: nothing may be evicted by any of these
    handlers = Handlers(service, DeathWatch(service, probe=probe, clock=clock))
    node_b = Credential(B)
    with pytest.raises(Forbidden):  # B's token speaking for A2's node
        post(handlers, a2, {"parent": a}, node_b)
    with pytest.raises(InvalidInput) as err:
        post(handlers, b, {"parent": a2}, node_b)  # not its parent
    assert err.value.field == "parent"
    with pytest.raises(InvalidInput) as err:
        post(handlers, b, {"parent": "10.0.0.1:other-image"}, node_b)
    assert "names volume" in err.value.detail
    with pytest.raises(InvalidInput) as err:
        post(handlers, b, {"parent": b}, node_b)
    assert "itself" in err.value.detail
    for body, field in (({}, "parent"), ({"parent": 5}, "parent"), ({"x": 1}, "x")):
        with pytest.raises(InvalidInput) as err:
            post(handlers, b, body, node_b)
        assert err.value.field == field
    with pytest.raises(MalformedBody):
        post(handlers, b, ["parent"], node_b)
    assert probe.calls == [] and len(service.trees[IMAGE]) == 3  # nothing checked or changed
    assert post(handlers, b, {"parent": a}, node_b) == 202
    assert post(handlers, b, {"parent": a}, ADMIN) == 202  # the admin may report for anyone
    handlers.deathwatch.stop()


# -- the bus -------------------------------------------------------------------------------
def test_parse_dead_parent_refuses_a_host_speaking_for_another():
    b, a = f"{B}:{IMAGE}", f"{A}:{IMAGE}"
    good = {"image": IMAGE, "peer_id": b, "parent": a, "host": B}
    assert parse_dead_parent(f"virtman.{B}", good) == Report(IMAGE, b, a, "bus")
    bad = [
        (f"virtman.{A2}", good),  # the publisher is not the payload's host
        (f"virtman.{A2}", dict(good, host=A2)),  # nor the reporter's host
        (f"virtman.{B}", dict(good, parent=f"{A}:other")),
        (f"virtman.{B}", dict(good, parent=b)),
        (f"virtman.{B}", dict(good, peer_id=f"{B}:other")),
        (f"virtman.{B}", dict(good, parent=7)),
        (f"virtman.{B}", "text"),
    ]
    for publisher, payload in bad:
        with pytest.raises(ValueError):
            parse_dead_parent(publisher, payload)


def test_a_report_over_the_bus_evicts_and_pushes(tree, transports):
    service, clock, _pushed, (a, _a2, b) = tree
    watch = DeathWatch(service, probe=Probe(), clock=clock)
    volt = VoltBus("fake:/", transports=transports).start()
    volt.events.on_dead_parent = watch.report
    service.on_parents_changed = volt.push
    got: dict[str, list] = {}
    child = NodeBus("fake:/", B, got.update, transports=transports).start()
    liar = NodeBus("fake:/", A2, got.update, transports=transports).start()
    try:
        assert child.wait_started(10) and liar.wait_started(10)
        wait_until(lambda: child.up, timeout_s=10, what="the bus to be up")
        # a host reporting for another's node is ignored
        liar.event(bus.EVENT_PARENT_DEAD, {"image": IMAGE, "peer_id": b, "parent": a})
        child.event(bus.EVENT_PARENT_DEAD, {"image": IMAGE, "peer_id": b, "parent": a})
        wait_counted(watch, "evicted")
        wait_until(lambda: b in got, timeout_s=10, what="the push to the child")
        assert a not in [p.peer_id for p in got[b]]
        assert volt.events.counts[bus.EVENT_PARENT_DEAD] == 2 and watch.counts["checking"] == 1
    finally:
        child.stop()
        liar.stop()
        volt.stop()
        watch.stop()


# -- a parent whose node daemon is alive: repairing ------------------------------------------
class PortProbe(Probe):
    """A fake TCP check by port: the (host, port) pairs in ``open`` accept."""

    def __init__(self, *open_: tuple[str, int]) -> None:
        super().__init__()
        self.open = set(open_)

    def __call__(self, host: str, port: int, timeout_s: float) -> bool:
        self.gate.wait(10)
        self.calls.append((host, port))
        return (host, port) in self.open


API = 7774  # the node daemon's port A's heartbeats announce


def decisions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name in ("volt.deathwatch", "volt.service")]


def test_a_parent_whose_node_daemon_answers_is_repairing_and_stays_once_repaired(tree, caplog):
    service, clock, pushed, (a, _a2, b) = tree
    service.heartbeat(A, api_port=API)
    probe = PortProbe((A, API))  # the data port refuses, the node daemon accepts
    watch = DeathWatch(service, probe=probe, clock=clock, repair_grace_s=10)
    caplog.set_level("INFO")
    assert watch.report(Report(IMAGE, b, a, "bus")) == "checking"
    wait_counted(watch, "repairing")
    assert probe.calls == [(A, 10809), (A, API)]
    assert a in service.trees[IMAGE].nodes and pushed.calls == []
    (line,) = [m for m in decisions(caplog) if "repairing" in m]
    assert f"{A}:10809 refuses" in line and f"{A}:{API}" in line and "not evicted" in line
    # during the grace, reports of the same host are folded into its pending second check
    assert watch.report(Report(IMAGE, b, a, "api")) == "checking"
    assert watch.counts["folded"] == 1 and watch.counts["checking"] == 1
    probe.open.add((A, 10809))  # the supervisor restarted the data daemon
    clock.now += 9.9
    threading.Event().wait(0.5)  # the thread looks (every 0.2 s at most): not due yet
    assert len(probe.calls) == 2
    clock.now += 0.2
    wait_counted(watch, "repaired")
    assert probe.calls[2:] == [(A, 10809)]
    assert a in service.trees[IMAGE].nodes and pushed.calls == [] and A in service.members
    assert service.metrics.evictions._value.get() == 0
    assert any(m.startswith(f"repaired: {A}:10809 accepts") for m in decisions(caplog))
    # found serving: the next report is answered at once
    assert watch.report(Report(IMAGE, b, a, "bus")) == "alive"
    check_tree(service.trees[IMAGE], service.executor, depth_bound=True)
    watch.stop()


def test_a_repairing_parent_still_refusing_after_the_grace_is_evicted(tree, caplog):
    service, clock, pushed, (a, _a2, b) = tree
    service.heartbeat(A, api_port=API)
    probe = PortProbe((A, API))
    watch = DeathWatch(service, probe=probe, clock=clock, repair_grace_s=10)
    caplog.set_level("INFO")
    assert watch.report(Report(IMAGE, b, a, "bus")) == "checking"
    wait_counted(watch, "repairing")
    clock.now += 10
    wait_counted(watch, "evicted")
    assert probe.calls == [(A, 10809), (A, API), (A, 10809)]  # the node daemon not again
    assert a not in service.trees[IMAGE].nodes and A not in service.members
    assert A not in service.api_ports  # forgotten with the host
    assert pushed.hosts() == {B}
    (line,) = [m for m in decisions(caplog) if m.startswith(f"evicting host {A}")]
    assert "still did not accept" in line and "10.0 s after its node daemon answered" in line
    check_tree(service.trees[IMAGE], service.executor, depth_bound=True)
    assert watch.report(Report(IMAGE, b, a, "bus")) == "gone"
    watch.stop()


def test_a_parent_whose_node_daemon_is_dead_too_is_evicted_at_once(tree, caplog):
    service, clock, pushed, (a, _a2, b) = tree
    service.heartbeat(A, api_port=API)
    probe = PortProbe()  # every daemon of A is dead (bench/bus_push.py's kills)
    watch = DeathWatch(service, probe=probe, clock=clock, repair_grace_s=10)
    caplog.set_level("INFO")
    assert watch.report(Report(IMAGE, b, a, "bus")) == "checking"
    wait_counted(watch, "evicted")
    assert probe.calls == [(A, 10809), (A, API)] and watch.counts["repairing"] == 0
    assert a not in service.trees[IMAGE].nodes and pushed.hosts() == {B}
    (line,) = [m for m in decisions(caplog) if m.startswith(f"evicting host {A}")]
    assert f"nor its node daemon's {A}:{API}" in line
    watch.stop()


def test_a_parent_that_announced_no_node_daemon_port_is_evicted_at_once(tree, caplog):
    service, clock, pushed, (a, _a2, b) = tree
    service.heartbeat(A)  # an older node: no api_port
    probe = PortProbe((A, API))  # even if something listens there, it is not probed
    watch = DeathWatch(service, probe=probe, clock=clock, repair_grace_s=10)
    caplog.set_level("INFO")
    assert watch.report(Report(IMAGE, b, a, "api")) == "checking"
    wait_counted(watch, "evicted")
    assert probe.calls == [(A, 10809)]
    (line,) = [m for m in decisions(caplog) if m.startswith(f"evicting host {A}")]
    assert f"{A} announced no node daemon port" in line
    assert pushed.hosts() == {B}
    watch.stop()


def test_the_heartbeat_takes_api_port_only_as_a_port(tree):
    service, clock, _pushed, (_a, _a2, _b) = tree
    handlers = Handlers(service, DeathWatch(service, probe=Probe(), clock=clock))

    def beat(body: object) -> int:
        req = Request(
            "PUT", "/v1/members/heartbeat", {}, A, {}, body=body, credential=Credential(A)
        )
        return handlers.heartbeat(req).status

    for bad in ("7774", 0, 65536, -1, True, 7774.0, [7774], {"port": 7774}):
        with pytest.raises(InvalidInput) as err:
            beat({"api_port": bad})
        assert err.value.field == "api_port"
    assert A not in service.api_ports  # nothing kept from a refused heartbeat
    assert beat({"api_port": 65535}) == 200 and service.api_ports[A] == 65535
    assert beat({"api_port": API}) == 200 and service.api_port(A) == API
    assert beat({}) == 200 and beat({"api_port": None}) == 200  # absent: kept as it was
    assert service.api_port(A) == API
    # a host without nodes is not remembered, nor is its port
    nine = "10.0.0.9"
    req = Request(
        "PUT",
        "/v1/members/heartbeat",
        {},
        nine,
        {},
        body={"api_port": API},
        credential=Credential(nine),
    )
    assert handlers.heartbeat(req).status == 200 and "10.0.0.9" not in service.api_ports
    # a host whose last node leaves is forgotten with its port
    service.evict_member(A, "test")
    assert service.api_port(A) is None
    handlers.deathwatch.stop()
