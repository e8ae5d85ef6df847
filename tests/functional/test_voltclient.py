"""voltclient and the ``volt`` command against a real volt-api process.

One requests Session always comes from 127.0.0.1, so tests act as different nodes through
the ``host`` field of ``volumes.get`` and ``members.heartbeat``, as the original allowed.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator

import pytest

from tests.functional.voltproc import VoltProcess, free_port
from voltclient import Client, Volume
from voltclient import exceptions as exc
from voltclient.shell import main

IQN = "iqn.2010-10.org.openstack:volume-img1"


@pytest.fixture
def client(volt: VoltProcess) -> Iterator[Client]:
    with Client(volt.url, token=volt.token, timeout=15) as c:
        yield c


def ok(peer_id: str, host: str, port: str = "3260", lun: str = "1") -> Volume:
    return Volume(host=host, port=port, iqn=IQN, lun=lun, status="OK", peer_id=peer_id)


def run(capsys: pytest.CaptureFixture[str], volt: VoltProcess, *argv: str) -> tuple[int, str, str]:
    code = main(["--endpoint", volt.url, "--token", str(volt.token), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def build_small_tree(client: Client) -> None:
    """Four nodes of img1 (balanced executor, fan-out 2): three registered, one pending.

    image server
    |-- 10.0.0.1 (registered at 192.168.0.1:3260)
    |   |-- 10.0.0.3 (registered, port 3261, lun 2)
    |   `-- 10.0.0.4 (pending)
    `-- fd00::2 (registered)
    """
    a, _ = client.volumes.get("img1", host="10.0.0.1")
    client.volumes.login("img1", a, "192.168.0.1", 3260, IQN, 1)
    b, _ = client.volumes.get("img1", host="fd00::2")
    client.volumes.login("img1", b, "fd00::2", 3260, IQN, 1)
    c, _ = client.volumes.get("img1", host="10.0.0.3")
    client.volumes.login("img1", c, "10.0.0.3", "3261", IQN, "2")
    client.volumes.get("img1", host="10.0.0.4")


# -- volumes.get -----------------------------------------------------------------------------
def test_get_places_nodes_and_returns_ready_parents(client: Client) -> None:
    assert client.volumes.get("img1", host="10.0.0.1") == ("10.0.0.1:img1", [])
    assert client.volumes.get("img1", host="10.0.0.1") == ("10.0.0.1:img1", [])  # idempotent
    assert client.volumes.get("img1", host="10.0.0.2") == ("10.0.0.2:img1", [])
    client.volumes.login("img1", "10.0.0.1:img1", "10.0.0.1", 3260, IQN, 1)

    # Under the ready 10.0.0.1; its sibling 10.0.0.2 is pending, so no standby parent yet.
    peer_id, parents = client.volumes.get("img1", host="10.0.0.3", port=3260, iqn=IQN, lun=1)
    assert (peer_id, parents) == ("10.0.0.3:img1", [ok("10.0.0.1:img1", "10.0.0.1")])
    assert all(isinstance(p, Volume) for p in parents)

    client.volumes.login("img1", "10.0.0.2:img1", "10.0.0.2", 3260, IQN, 1)
    assert client.volumes.get("img1", host="10.0.0.3") == (
        "10.0.0.3:img1",
        [ok("10.0.0.1:img1", "10.0.0.1"), ok("10.0.0.2:img1", "10.0.0.2")],
    )


def test_get_without_host_uses_the_source_address(volt: VoltProcess, client: Client) -> None:
    assert client.volumes.get("img1") == ("127.0.0.1:img1", [])
    status, body = volt.request("GET", "/v1/volumes/query/img1", {}, source="127.0.0.5")
    assert (status, body) == (200, {"peer_id": "127.0.0.5:img1", "parents": []})
    assert [m["host"] for m in client.members.list()] == ["127.0.0.1", "127.0.0.5"]


def test_get_peer_id_field_must_match_the_caller(client: Client) -> None:
    assert client.volumes.get("img1", host="10.0.0.1", peer_id="10.0.0.1:img1") == (
        "10.0.0.1:img1",
        [],
    )
    with pytest.raises(exc.BadRequest) as info:
        client.volumes.get("img1", host="10.0.0.1", peer_id="10.0.0.9:img1")
    assert info.value.code == "volt.invalid_input"
    assert "'peer_id'" in info.value.detail


def test_get_ipv6_host_and_volume_id_with_colons(client: Client) -> None:
    peer_id, parents = client.volumes.get("volume:img:1", host="FD00:0:0::5")
    assert (peer_id, parents) == ("[fd00::5]:volume:img:1", [])
    volume = client.volumes.login("volume:img:1", peer_id, "fd00::5", 3260, IQN, 0)
    assert volume == Volume("fd00::5", "3260", IQN, "0", "OK", "[fd00::5]:volume:img:1")
    assert client.volumes.list() == [{"id": "volume:img:1", "count": 1}]


def test_get_rejects_unknown_keywords_like_the_original(client: Client) -> None:
    with pytest.raises(TypeError, match="'hostname'"):
        client.volumes.get("img1", hostname="10.0.0.1")


def test_get_not_placeable_answer_is_the_original_shape(volt_factory) -> None:
    volt = volt_factory(default_executor="btree")
    with Client(volt.url, token=volt.token) as client:
        assert client.volumes.get("img1", host="10.0.0.1") == ("10.0.0.1:img1", [])
        assert client.volumes.get("img1", host="10.0.0.2") == ("10.0.0.2:img1", [])
        # The image server's two slots are taken and no node relays yet: retry later.
        peer_id, parents = client.volumes.get("img1", host="10.0.0.3")
        assert peer_id is None
        assert parents == [Volume()]
        assert parents[0].peer_id is None and parents[0].to_dict() == {
            "host": None,
            "port": None,
            "iqn": None,
            "lun": None,
            "status": None,
            "peer_id": None,
        }
        client.volumes.login("img1", "10.0.0.1:img1", "10.0.0.1", 3260, IQN, 1)
        assert client.volumes.get("img1", host="10.0.0.3") == (
            "10.0.0.3:img1",
            [ok("10.0.0.1:img1", "10.0.0.1")],
        )


# -- login / logout / list / delete ----------------------------------------------------------
def test_login_returns_the_identity_and_is_idempotent(client: Client) -> None:
    peer_id, _ = client.volumes.get("img1", host="10.0.0.1")
    expected = Volume("192.168.0.1", "3260", IQN, "1", "OK", "10.0.0.1:img1")
    assert client.volumes.login("img1", peer_id, "192.168.0.1", 3260, IQN, 1) == expected
    assert client.volumes.login("img1", peer_id, "192.168.0.1", "3260", IQN, "1") == expected
    assert expected.to_dict() == {
        "host": "192.168.0.1",
        "port": "3260",
        "iqn": IQN,
        "lun": "1",
        "status": "OK",
        "peer_id": "10.0.0.1:img1",
    }


def test_login_answers_the_parents_after_a_burst(client: Client) -> None:
    """Issue 15: every node of a burst is placed (pending parents) before any registers.
    The register answer names the node's parents now: the balanced executor lifted the
    registered node above its pending ancestors, so its first parent is ready, or there is
    none (the image server); a heartbeat answers the same."""
    hosts = [f"10.0.1.{i}" for i in range(1, 8)]
    for host in hosts:
        client.volumes.get("img1", host=host)
    for host in reversed(hosts):  # the deepest registers first
        peer_id = f"{host}:img1"
        node, parents = client.volumes.login_with_parents("img1", peer_id, host, 3260, IQN, 1)
        assert node == ok(peer_id, host)
        assert parents is not None and all(p.ready for p in parents)
        [beat] = client.members.heartbeat(host)
        assert beat["parents"] == parents
    # the first to register was lifted to the top: it reads from the image server
    assert (
        client.volumes.login_with_parents("img1", "10.0.1.7:img1", "10.0.1.7", 3260, IQN, 1)[1]
        == []
    )


def test_login_of_an_unknown_peer_is_not_found(client: Client) -> None:
    client.volumes.get("img1", host="10.0.0.1")
    with pytest.raises(exc.NotFound) as info:
        client.volumes.login("img1", "10.0.0.9:img1", "10.0.0.9", 3260, IQN, 1)
    assert info.value.status == 404
    assert info.value.code == "volt.peer.not_found"
    assert info.value.detail == "peer '10.0.0.9:img1' is not in the tree of volume 'img1'"


def test_logout_takes_the_node_out(client: Client) -> None:
    client.volumes.get("img1", host="10.0.0.1")
    client.volumes.get("img1", host="10.0.0.2")
    assert client.volumes.logout("img1", "10.0.0.1:img1") is None
    assert [n["peer_id"] for n in client.volumes.list("img1")] == ["10.0.0.2:img1"]
    assert client.members.heartbeat(host="10.0.0.1") == []
    with pytest.raises(exc.NotFound) as info:
        client.volumes.logout("img1", "10.0.0.1:img1")
    assert info.value.code == "volt.peer.not_found"


def test_logout_of_an_ipv6_peer(client: Client) -> None:
    client.volumes.get("img1", host="fd00::5")
    client.volumes.get("img1", host="fd00::6")
    client.volumes.logout("img1", "[fd00::5]:img1")
    assert [n["peer_id"] for n in client.volumes.list("img1")] == ["[fd00::6]:img1"]
    with pytest.raises(exc.NotFound) as info:
        client.volumes.logout("img1", "[fd00::5]:img1")
    assert info.value.path == "/v1/volumes/img1/[fd00::5]:img1"  # shown unquoted
    assert str(info.value).startswith(
        "DELETE /v1/volumes/img1/[fd00::5]:img1 -> 404 volt.peer.not_found: "
    )
    # When the last node leaves, the tree goes away.
    client.volumes.logout("img1", "[fd00::6]:img1")
    with pytest.raises(exc.NotFound):
        client.volumes.list("img1")


def test_list_volumes_and_show_one(client: Client) -> None:
    assert client.volumes.list() == []
    build_small_tree(client)
    client.volumes.get("img0", host="10.0.0.1")
    assert client.volumes.list() == [{"id": "img0", "count": 1}, {"id": "img1", "count": 4}]

    def entry(
        peer_id: str,
        host: str,
        port: str | None,
        lun: str | None,
        status: str,
        parent: str | None,
        depth: int,
        parents: list[str],
    ) -> dict[str, object]:
        return {
            "host": host,
            "port": port,
            "iqn": IQN if port else None,
            "lun": lun,
            "status": status,
            "peer_id": peer_id,
            "parent": parent,
            "depth": depth,
            "parents": parents,
        }

    assert client.volumes.list("img1") == [
        entry("10.0.0.1:img1", "192.168.0.1", "3260", "1", "OK", None, 1, []),
        entry("[fd00::2]:img1", "fd00::2", "3260", "1", "OK", None, 1, []),
        entry(
            "10.0.0.3:img1",
            "10.0.0.3",
            "3261",
            "2",
            "OK",
            "10.0.0.1:img1",
            2,
            ["10.0.0.1:img1", "[fd00::2]:img1"],
        ),
        entry(
            "10.0.0.4:img1",
            "10.0.0.4",
            None,
            None,
            "pending",
            "10.0.0.1:img1",
            2,
            ["10.0.0.1:img1", "[fd00::2]:img1"],
        ),
    ]


def test_delete_volume(client: Client) -> None:
    build_small_tree(client)
    client.volumes.get("img2", host="10.0.0.1")
    assert client.volumes.delete("img1") is None
    assert client.volumes.list() == [{"id": "img2", "count": 1}]
    assert client.members.heartbeat(host="10.0.0.3") == []
    with pytest.raises(exc.NotFound) as info:
        client.volumes.delete("img1")
    assert info.value.code == "volt.volume.not_found"
    assert info.value.detail == "volume 'img1' has no tree"


# -- members ---------------------------------------------------------------------------------
def test_heartbeat_returns_the_parents_of_each_node(client: Client) -> None:
    build_small_tree(client)
    client.volumes.get("img0", host="10.0.0.4")
    parents = [ok("10.0.0.1:img1", "192.168.0.1"), ok("[fd00::2]:img1", "fd00::2")]
    assert client.members.heartbeat(host="10.0.0.4") == [
        {"peer_id": "10.0.0.4:img0", "parents": []},
        {"peer_id": "10.0.0.4:img1", "parents": parents},
    ]
    assert client.members.heartbeat(host="fd00::2") == [
        {"peer_id": "[fd00::2]:img1", "parents": []}
    ]
    assert client.members.heartbeat(host="10.0.0.99") == []
    assert client.members.heartbeat() == []  # 127.0.0.1 runs no node


def test_heartbeat_without_host_is_the_source_address(client: Client) -> None:
    client.volumes.get("img1")
    assert client.members.heartbeat() == [{"peer_id": "127.0.0.1:img1", "parents": []}]


def test_members_list(client: Client) -> None:
    assert client.members.list() == []
    build_small_tree(client)
    client.volumes.get("img0", host="10.0.0.4")
    members = client.members.list()
    assert [(m["host"], m["peer_ids"]) for m in members] == [
        ("10.0.0.1", ["10.0.0.1:img1"]),
        ("10.0.0.3", ["10.0.0.3:img1"]),
        ("10.0.0.4", ["10.0.0.4:img0", "10.0.0.4:img1"]),
        ("fd00::2", ["[fd00::2]:img1"]),
    ]
    for m in members:
        assert set(m) == {"host", "seconds_since_heartbeat", "peer_ids"}
        assert 0 <= m["seconds_since_heartbeat"] < 30


# -- errors ----------------------------------------------------------------------------------
def test_wrong_token_is_unauthorized(volt: VoltProcess) -> None:
    with Client(volt.url, token="wrong") as client, pytest.raises(exc.Unauthorized) as info:
        client.volumes.list()
    err = info.value
    assert (err.status, err.code, err.detail) == (
        401,
        "volt.unauthenticated",
        "missing or wrong X-Auth-Token",
    )
    assert (err.method, err.path) == ("GET", "/v1/volumes")
    assert err.request_id is not None and err.request_id.startswith("req-")
    assert str(err) == (
        "GET /v1/volumes -> 401 volt.unauthenticated: missing or wrong X-Auth-Token "
        f"[{err.request_id}]"
    )
    with Client(volt.url) as client, pytest.raises(exc.Unauthorized):
        client.members.list()


def test_unknown_volume_is_not_found(client: Client) -> None:
    with pytest.raises(exc.NotFound) as info:
        client.volumes.list("nope")
    assert (info.value.status, info.value.code) == (404, "volt.volume.not_found")
    assert str(info.value).startswith(
        "GET /v1/volumes/nope -> 404 volt.volume.not_found: volume 'nope' has no tree ["
    )


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.volumes.get("img1", host="10.0.0.1", port=0), "port"),
        (lambda c: c.volumes.get("img1", host="10.0.0.1", lun="x"), "lun"),
        (lambda c: c.volumes.get("img1", host="not a host"), "host"),
        (lambda c: c.volumes.get("bad id"), "volume_id"),
        (lambda c: c.volumes.login("img1", "10.0.0.1:img1", "10.0.0.1", 70000, IQN, 1), "port"),
        (lambda c: c.volumes.login("img1", "10.0.0.1:img1", "10.0.0.1", 3260, "x", 1), "iqn"),
        (lambda c: c.volumes.login("img1", "10.0.0.1:img2", "10.0.0.1", 3260, IQN, 1), "peer_id"),
        (lambda c: c.members.heartbeat(host="-bad-"), "host"),
    ],
)
def test_bad_values_are_bad_requests_naming_the_field(client: Client, call, field) -> None:
    client.volumes.get("img1", host="10.0.0.1")
    with pytest.raises(exc.BadRequest) as info:
        call(client)
    assert info.value.status == 400
    assert info.value.code == "volt.invalid_input"
    assert info.value.detail.startswith(f"invalid {field!r}: ")
    assert f"400 volt.invalid_input: invalid {field!r}" in str(info.value)


def test_empty_path_components_are_refused_before_sending(client: Client) -> None:
    with pytest.raises(ValueError, match="volume_id must not be empty"):
        client.volumes.list("")
    with pytest.raises(ValueError, match="peer_id must not be empty"):
        client.volumes.logout("img1", "")


def test_store_failure_is_service_unavailable(volt: VoltProcess, client: Client) -> None:
    db = sqlite3.connect(volt.workdir / "volt.sqlite", isolation_level=None, timeout=10)
    try:
        db.execute("BEGIN IMMEDIATE")  # hold the write lock past volt-api's busy timeout
        with pytest.raises(exc.ServiceUnavailable) as info:
            client.volumes.get("img1", host="10.0.0.1")
        assert (info.value.status, info.value.code) == (503, "volt.store.unavailable")
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert client.volumes.get("img1", host="10.0.0.1") == ("10.0.0.1:img1", [])


def test_connection_refused_is_connection_failed() -> None:
    port = free_port()
    with Client(f"http://127.0.0.1:{port}/") as client, pytest.raises(exc.ConnectionFailed) as info:
        client.volumes.list()
    assert info.value.status is None and info.value.code is None
    assert str(info.value) == (
        f"GET /v1/volumes: cannot reach http://127.0.0.1:{port}: Connection refused"
    )
    assert isinstance(info.value, exc.VoltClientError)


def test_no_answer_in_time_is_connection_failed() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}", timeout=0.3)
        with client, pytest.raises(exc.ConnectionFailed) as info:
            client.members.list()
    assert str(info.value) == (
        f"GET /v1/members: no answer from http://127.0.0.1:{port} within 0.3s"
    )


def test_endpoint_without_scheme_is_http(volt: VoltProcess) -> None:
    with Client(f"127.0.0.1:{volt.port}", token=volt.token) as client:
        assert client.volumes.list() == []


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, exc.BadRequest),
        (401, exc.Unauthorized),
        (404, exc.NotFound),
        (405, exc.VoltClientError),
        (409, exc.Conflict),
        (500, exc.VoltClientError),
        (503, exc.ServiceUnavailable),
    ],
)
def test_status_to_exception_mapping(status: int, cls: type[exc.VoltClientError]) -> None:
    body = (
        b'{"errors": [{"status": %d, "code": "volt.x", "title": "T", "detail": "why", '
        b'"request_id": "req-1"}]}' % status
    )
    err = exc.from_response("PUT", "/v1/x", status, body)
    assert type(err) is cls
    assert (err.status, err.code, err.detail, err.request_id) == (status, "volt.x", "why", "req-1")
    assert str(err) == f"PUT /v1/x -> {status} volt.x: why [req-1]"


def test_error_without_json_body_keeps_the_text() -> None:
    err = exc.from_response("GET", "/v1/volumes", 502, b"<html>Bad Gateway</html>", "req-9")
    assert type(err) is exc.VoltClientError
    assert str(err) == "GET /v1/volumes -> 502: <html>Bad Gateway</html> [req-9]"


# -- the volt command ------------------------------------------------------------------------
SMALL_TREE = """\
image server (img1, 4 nodes)
|-- 10.0.0.1:img1  OK  192.168.0.1:3260
|   |-- 10.0.0.3:img1  OK  10.0.0.3:3261  standby: [fd00::2]:img1
|   `-- 10.0.0.4:img1  pending  standby: [fd00::2]:img1
`-- [fd00::2]:img1  OK  [fd00::2]:3260
"""


def test_cli_volume_show_prints_the_tree(volt: VoltProcess, client: Client, capsys) -> None:
    build_small_tree(client)
    assert run(capsys, volt, "volume-show", "img1") == (0, SMALL_TREE, "")


def test_cli_volume_show_after_a_node_registers_under_a_pending_parent(
    volt: VoltProcess, client: Client, capsys
) -> None:
    """A node that registers under a pending parent swaps up past it (readiness order)."""
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        client.volumes.get("img1", host=host)  # nobody ready: 10.0.0.3 goes under 10.0.0.1
    client.volumes.login("img1", "10.0.0.2:img1", "10.0.0.2", 3260, IQN, 1)
    client.volumes.login("img1", "10.0.0.3:img1", "10.0.0.3", 3260, IQN, 1)
    assert run(capsys, volt, "volume-show", "img1") == (
        0,
        "image server (img1, 3 nodes)\n"
        "|-- 10.0.0.3:img1  OK  10.0.0.3:3260\n"
        "|   `-- 10.0.0.1:img1  pending  standby: 10.0.0.2:img1\n"
        "`-- 10.0.0.2:img1  OK  10.0.0.2:3260\n",
        "",
    )


def test_cli_volume_show_of_an_emptied_tree(volt: VoltProcess, client: Client, capsys) -> None:
    """The last node left: the tree is gone, and the CLI says so in one line."""
    client.volumes.get("img1", host="10.0.0.1")
    client.volumes.logout("img1", "10.0.0.1:img1")
    code, out, err = run(capsys, volt, "volume-show", "img1")
    assert (code, out) == (1, "")
    assert err.startswith("volt: error: GET /v1/volumes/img1 -> 404 volt.volume.not_found")


def test_cli_volume_list(volt: VoltProcess, client: Client, capsys) -> None:
    assert run(capsys, volt, "volume-list") == (0, "ID  COUNT\n", "")
    build_small_tree(client)
    client.volumes.get("volume-0001", host="10.0.0.1")
    assert run(capsys, volt, "volume-list") == (
        0,
        "ID           COUNT\nimg1         4\nvolume-0001  1\n",
        "",
    )


def test_cli_node_list(volt: VoltProcess, client: Client, capsys) -> None:
    build_small_tree(client)
    client.volumes.get("img0", host="10.0.0.4")
    code, out, err = run(capsys, volt, "node-list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "HOST      SECONDS SINCE HEARTBEAT  NODES"
    rows = [line.split("  ") for line in lines[1:]]
    rows = [[cell.strip() for cell in row if cell.strip()] for row in rows]
    assert [(r[0], r[2]) for r in rows] == [
        ("10.0.0.1", "10.0.0.1:img1"),
        ("10.0.0.3", "10.0.0.3:img1"),
        ("10.0.0.4", "10.0.0.4:img0, 10.0.0.4:img1"),
        ("fd00::2", "[fd00::2]:img1"),
    ]
    for r in rows:
        assert 0 <= float(r[1]) < 30 and r[1] == f"{float(r[1]):.1f}"


def test_cli_volume_delete(volt: VoltProcess, client: Client, capsys) -> None:
    build_small_tree(client)
    assert run(capsys, volt, "volume-delete", "img1") == (
        0,
        "deleted the tree of volume img1\n",
        "",
    )
    assert client.volumes.list() == []
    code, out, err = run(capsys, volt, "volume-delete", "img1")
    assert (code, out) == (1, "")
    assert err.startswith(
        "volt: error: DELETE /v1/volumes/img1 -> 404 volt.volume.not_found: "
        "volume 'img1' has no tree [req-"
    )
    assert err.count("\n") == 1


def test_cli_errors_are_one_line_and_exit_1(volt: VoltProcess, capsys) -> None:
    code, out, err = run(capsys, volt, "volume-show", "nope")
    assert (code, out) == (1, "")
    assert err.startswith(
        "volt: error: GET /v1/volumes/nope -> 404 volt.volume.not_found: "
        "volume 'nope' has no tree [req-"
    )
    assert err.endswith("]\n") and err.count("\n") == 1

    assert main(["--endpoint", volt.url, "--token", "wrong", "node-list"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("volt: error: GET /v1/members -> 401 volt.unauthenticated: ")

    port = free_port()
    assert main(["--endpoint", f"http://127.0.0.1:{port}", "volume-list"]) == 1
    assert capsys.readouterr() == (
        "",
        f"volt: error: GET /v1/volumes: cannot reach http://127.0.0.1:{port}: Connection refused\n",
    )


def test_cli_reads_endpoint_and_token_from_the_environment(
    volt: VoltProcess, client: Client, capsys, monkeypatch
) -> None:
    client.volumes.get("img1", host="10.0.0.1")
    monkeypatch.setenv("VOLT_URL", volt.url)
    monkeypatch.setenv("VOLT_TOKEN", str(volt.token))
    assert main(["volume-list"]) == 0
    assert capsys.readouterr() == ("ID    COUNT\nimg1  1\n", "")
    assert main(["--token", "wrong", "volume-list"]) == 1  # the option wins
    assert "401 volt.unauthenticated" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        ([], ["--endpoint", "VOLT_URL", "VOLT_TOKEN", "volume-list", "node-list"]),
        (["volume-list"], ["number of nodes", "image"]),
        (["volume-show"], ["ID", "standby", "pending"]),
        (["volume-delete"], ["ID", "Forget"]),
        (["node-list"], ["heartbeat", "evicted"]),
    ],
)
def test_cli_help(argv: list[str], wanted: list[str], capsys) -> None:
    assert main([*argv, "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: volt") and err == ""
    for word in wanted:
        assert word in out


def test_cli_usage_errors_exit_2(capsys) -> None:
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err
    assert main(["volume-show"]) == 2
    assert "required: ID" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
