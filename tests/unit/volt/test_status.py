"""The status page's data (volt/cluster/status.py) and files, through volt-api's RSGI app
with fake nodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from brick.wait import wait_until
from tests.unit.volt.cluster_fakes import FakeNode, call, client_factory
from volt.api.app import VoltApp
from volt.cluster.controller import Controller
from volt.service import VoltService
from volt.store import Store
from volt.topology import load_executor

VOLUME = "volume-tiny"


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        nodes = [FakeNode("n1"), FakeNode("n2")]
        self.nodes = {n.endpoint.id: n for n in nodes}
        self.store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
        self.controller = Controller(
            self.store, [n.endpoint for n in nodes], workers=2,
            client_factory=client_factory(self.nodes),
        )  # fmt: skip
        self.service = VoltService(self.store, load_executor("balanced"), node_timeout=60)
        self.app = VoltApp(self.service, auth_token="admin", cluster=self.controller)

    def close(self) -> None:
        self.controller.close()
        self.store.dispose()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_status_needs_the_admin_token_and_shows_trees_nodes_and_tasks(rig: Rig) -> None:
    hosts = ["127.0.0.1", "10.0.0.2", "10.0.0.3"]  # the first is both n1's and n2's address
    for host in hosts:
        peer = rig.service.query(VOLUME, host).node
        assert peer is not None
    rig.service.register(VOLUME, f"{hosts[0]}:{VOLUME}", hosts[0], "3260", "iqn.x:a", "1")
    burst = {"image": "tiny", "count": 2, "flavor": {"vcpus": 1, "memory_mb": 64}}
    status, task, _ = call(rig.app, "POST", "/v1/clusters", burst)
    assert status == 202
    wait_until(
        lambda: all(vm.status == "RUNNING" for vm in rig.controller.vms(task["task"])),
        timeout_s=10, what="the burst",
    )  # fmt: skip

    status, body, _ = call(rig.app, "GET", "/v1/status", token=None)
    assert status == 401 and set(body) == {"errors"}
    assert call(rig.app, "GET", "/v1/status", token="wrong")[0] == 401

    status, snap, _ = call(rig.app, "GET", "/v1/status")
    assert status == 200
    (image,) = snap["images"]
    assert (image["id"], image["count"], image["truncated"]) == (VOLUME, 3, False)
    by_peer = {n["peer_id"]: n for n in image["nodes"]}
    views = {e["peer_id"]: e for e in call(rig.app, "GET", f"/v1/volumes/{VOLUME}")[1]}
    assert set(by_peer) == set(views)
    for peer_id, view in views.items():
        assert by_peer[peer_id]["parent"] == view["parent"]
        assert by_peer[peer_id]["depth"] == view["depth"]
        assert by_peer[peer_id]["status"] == view["status"]
    assert image["depth"] == max(v["depth"] for v in views.values())
    assert all(n["bytes_read"] is None for n in image["nodes"])  # no node reported any
    assert image["bytes_read"] == {"image_server": 0, "peers": 0, "nodes_reporting": 0}

    nodes = {n["id"]: n for n in snap["nodes"]}
    assert set(nodes) == {"n1", "n2", "10.0.0.2", "10.0.0.3"}
    assert nodes["n1"]["cache"] == [VOLUME] and nodes["10.0.0.2"]["status"] == "member"
    assert sorted(len(nodes[n]["vms"]) for n in ("n1", "n2")) == [1, 1]
    (shown,) = snap["tasks"]
    assert (shown["task"], shown["status"], shown["counts"]) == (
        task["task"], "DONE", {"RUNNING": 2})  # fmt: skip


def test_page_files_are_public_hold_no_data_and_forbid_inline_script(rig: Rig) -> None:
    rig.service.query(VOLUME, "10.9.9.9")
    for path, kind in [("/status", "text/html"), ("/status/status.js", "text/javascript"),
                       ("/status/status.css", "text/css")]:  # fmt: skip
        status, text, got = call(rig.app, "GET", path, token=None)
        assert status == 200 and got.startswith(kind), path
        assert "10.9.9.9" not in text
    status, _, _ = call(rig.app, "GET", "/status/../volt.sqlite", token=None)
    assert status == 404
    assert call(rig.app, "GET", "/status/nope.js", token=None)[0] == 404


def heartbeat(rig: Rig, host: str, bytes_read: object) -> tuple[int, object]:
    status, body, _ = call(
        rig.app, "PUT", "/v1/members/heartbeat", {"host": host, "bytes_read": bytes_read}
    )
    return status, body


def test_status_shows_the_bytes_each_node_read_per_source_from_its_heartbeat(rig: Rig) -> None:
    root, child = "10.0.0.2", "10.0.0.3"
    for host in (root, child):
        rig.service.query(VOLUME, host)
        rig.service.register(VOLUME, f"{host}:{VOLUME}", host, "3260", f"iqn.x:{host}", "1")
    # "low" read from "high" (once its parent, say) and from the image server
    low_host, high_host = child, root
    low, high = f"{child}:{VOLUME}", f"{root}:{VOLUME}"
    assert heartbeat(rig, high_host, [
        {"peer_id": high, "source": None, "bytes": 5 << 20}])[0] == 200  # fmt: skip
    assert heartbeat(rig, low_host, [
        {"peer_id": low, "source": None, "bytes": 1 << 20},
        {"peer_id": low, "source": high, "bytes": 4 << 20},
    ])[0] == 200  # fmt: skip

    _, snap, _ = call(rig.app, "GET", "/v1/status")
    (image,) = snap["images"]
    nodes = {n["peer_id"]: n for n in image["nodes"]}
    assert nodes[low]["bytes_read"] == [
        {"source": None, "bytes": 1 << 20}, {"source": high, "bytes": 4 << 20}]  # fmt: skip
    assert nodes[high]["bytes_read"] == [{"source": None, "bytes": 5 << 20}]
    assert (nodes[high]["bytes_served"], nodes[low]["bytes_served"]) == (4 << 20, 0)
    assert image["bytes_read"] == {"image_server": 6 << 20, "peers": 4 << 20,
                                   "nodes_reporting": 2}  # fmt: skip

    # The latest report replaces the host's previous one; an empty one clears it.
    assert heartbeat(rig, low_host, [])[0] == 200
    _, snap, _ = call(rig.app, "GET", "/v1/status")
    assert snap["images"][0]["bytes_read"]["peers"] == 0
    # A heartbeat without bytes_read (the original's nodes) leaves the counters alone.
    assert call(rig.app, "PUT", "/v1/members/heartbeat", {"host": high_host})[0] == 200
    _, snap, _ = call(rig.app, "GET", "/v1/status")
    assert snap["images"][0]["bytes_read"]["image_server"] == 5 << 20


@pytest.mark.parametrize(
    ("bytes_read", "names"),
    [
        ({"peer_id": "x"}, "bytes_read"),
        ([{"peer_id": "10.0.0.2:v", "source": None}], "bytes_read[0]"),
        ([{"peer_id": "10.0.0.2:v", "source": None, "bytes": -1}], "bytes_read[0]"),
        ([{"peer_id": "10.0.0.2:v", "source": None, "bytes": True}], "bytes_read[0]"),
        ([{"peer_id": "10.0.0.2:v", "source": "nope", "bytes": 1}], "bytes_read[0]"),
        ([{"peer_id": "10.0.0.9:v", "source": None, "bytes": 1}], "bytes_read"),  # not its own
    ],
)
def test_a_heartbeat_with_bad_read_counters_is_refused_naming_the_field(
    rig: Rig, bytes_read: object, names: str
) -> None:
    rig.service.query(VOLUME, "10.0.0.2")
    status, body = heartbeat(rig, "10.0.0.2", bytes_read)
    assert status == 400, body
    assert body["errors"][0]["detail"].startswith(f"invalid {names!r}"), body  # type: ignore[index]
    assert rig.service.traffic.of("10.0.0.9:v") is None


def test_status_shows_each_vms_last_migration_those_under_way_first(rig: Rig) -> None:
    burst = {"image": "tiny", "count": 2, "flavor": {"vcpus": 1, "memory_mb": 64}}
    wait_until(lambda: all(rig.controller.capacity.get(n) for n in ("n1", "n2")), timeout_s=10,
               what="both nodes' capacity")  # fmt: skip
    status, task, _ = call(rig.app, "POST", "/v1/clusters", burst)
    assert status == 202
    vms = wait_until(
        lambda: (v := rig.controller.vms(task["task"])) and all(
            vm.status == "RUNNING" for vm in v) and v,
        timeout_s=10, what="the burst",
    )  # fmt: skip
    moved, failed = vms
    other = {"n1": "n2", "n2": "n1"}
    rig.nodes[failed.node].fail = "guest_migrate"
    for vm in (moved, failed):
        answer = call(
            rig.app, "POST", f"/v1/vms/{vm.userid}/migrate", {"destination": other[vm.node]}
        )
        assert answer[0] == 202, answer

    def settled() -> list[dict] | None:
        shown = call(rig.app, "GET", "/v1/status")[1]["migrations"]
        return shown if all(m["state"] != "migrating" for m in shown) else None

    shown = {m["userid"]: m for m in wait_until(settled, timeout_s=10, what="both settled")}
    assert shown[moved.userid] == {
        "vm": moved.name, "userid": moved.userid, "from": moved.node, "to": other[moved.node],
        "state": "done", "disk_bytes": 16 << 20, "memory_bytes": 90 << 20, "seconds": 3.5,
        "error": None,
    }  # fmt: skip
    assert shown[failed.userid]["state"] == "failed"
    assert f"guest_migrate on {failed.node}" in shown[failed.userid]["error"]
    nodes = {n["id"]: n for n in call(rig.app, "GET", "/v1/status")[1]["nodes"]}
    assert all(vm["migrating_to"] is None for n in nodes.values() for vm in n["vms"])
