"""The original protocol, byte for byte, against a real volt-api (raw HTTP on 127.0.0.0/8)."""

from __future__ import annotations

import json
import socket

IQN = "iqn.2010-10.org.openstack:volume-image1"


def raw(volt, method: str, path: str, source: str, body: dict | None = None, token=True):
    """Send one HTTP/1.1 request as bytes from ``source``; return (status, headers, body)."""
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", "Host: volt", "Connection: close"]
    if token:
        head.append(f"X-Auth-Token: {volt.token}")
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    data = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    with socket.create_connection(
        ("127.0.0.1", volt.port), timeout=10, source_address=(source, 0)
    ) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    header_blob, _, content = response.partition(b"\r\n\r\n")
    lines = header_blob.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(content) or method == "HEAD"
    return status, headers, json.loads(content) if content else None


def identity(host, status="OK", volume="volume-image1"):
    registered = status == "OK"
    return {
        "host": host,
        "port": "3260" if registered else None,
        "iqn": f"iqn.2010-10.org.openstack:{volume}" if registered else None,
        "lun": "1" if registered else None,
        "status": status,
        "peer_id": f"{host}:{volume}",
    }


def register(volt, host):
    body = {"host": host, "port": "3260", "iqn": IQN, "lun": "1"}
    return raw(volt, "POST", f"/v1/volumes/volume-image1/{host}:volume-image1", host, body)


def test_query_register_heartbeat_delete(volt_factory):
    volt = volt_factory(default_executor="btree")
    a, b, c = "127.0.0.11", "127.0.0.12", "127.0.0.13"

    # The first node of an image reads from the image server: parents [].
    status, headers, body = raw(volt, "GET", "/v1/volumes/query/volume-image1", a)
    assert status == 200 and headers["content-type"] == "application/json"
    assert body == {"peer_id": f"{a}:volume-image1", "parents": []}
    # A query is idempotent.
    assert raw(volt, "GET", "/v1/volumes/query/volume-image1", a)[2] == body
    assert raw(volt, "GET", "/v1/volumes/query/volume-image1", b)[2] == {
        "peer_id": f"{b}:volume-image1",
        "parents": [],
    }
    # btree: both top slots are pending, so the third node must retry (original signal).
    assert raw(volt, "GET", "/v1/volumes/query/volume-image1", c)[2] == {
        "peer_id": None,
        "parents": [{"peer_id": None}],
    }

    status, _, body = register(volt, a)
    # the original's identity, plus the node's parents now (issue 15; a top-level node: none)
    assert (status, body) == (200, {**identity(a), "parents": []})
    assert raw(volt, "GET", "/v1/volumes/query/volume-image1", c)[2] == {
        "peer_id": f"{c}:volume-image1",
        "parents": [identity(a)],
    }
    assert raw(volt, "GET", "/v1/volumes", a)[2] == [{"id": "volume-image1", "count": 3}]

    # Heartbeat: one entry per node of the calling host, with its parents.
    status, _, body = raw(volt, "PUT", "/v1/members/heartbeat", c)
    assert (status, body) == (200, [{"peer_id": f"{c}:volume-image1", "parents": [identity(a)]}])
    assert raw(volt, "PUT", "/v1/members/heartbeat", "127.0.0.99")[2] == []

    # The image's nodes (fixed: the original answered 500).
    status, _, nodes = raw(volt, "GET", "/v1/volumes/volume-image1", a)
    assert status == 200
    assert [(n["peer_id"], n["status"], n["parent"], n["depth"]) for n in nodes] == [
        (f"{a}:volume-image1", "OK", None, 1),
        (f"{b}:volume-image1", "pending", None, 1),
        (f"{c}:volume-image1", "pending", f"{a}:volume-image1", 2),
    ]
    status, headers, body = raw(volt, "HEAD", "/v1/volumes/volume-image1", a)
    assert status == 200 and body is None

    # The parent leaves: its child is re-parented and learns it on its next heartbeat.
    status, _, body = raw(volt, "DELETE", f"/v1/volumes/volume-image1/{a}:volume-image1", a)
    assert (status, body) == (200, None)
    assert raw(volt, "PUT", "/v1/members/heartbeat", c)[2] == [
        {"peer_id": f"{c}:volume-image1", "parents": []}
    ]
    assert raw(volt, "PUT", "/v1/members/heartbeat", a)[2] == []

    # Deleting the whole tree (fixed: the original answered 500).
    assert raw(volt, "DELETE", "/v1/volumes/volume-image1", a)[:1] == (200,)
    assert raw(volt, "GET", "/v1/volumes", a)[2] == []
    status, _, body = raw(volt, "DELETE", "/v1/volumes/volume-image1", a)
    assert status == 404 and body["errors"][0]["code"] == "volt.volume.not_found"


def test_balanced_answers_at_once_with_two_parents(volt):
    hosts = [f"127.0.0.{i}" for i in range(21, 28)]
    answers = [raw(volt, "GET", "/v1/volumes/query/volume-image1", h)[2] for h in hosts]
    assert all(a["peer_id"] == f"{h}:volume-image1" for a, h in zip(answers, hosts, strict=True))
    # Node 3 sits under node 1, still pending: it sees it first and no standby yet.
    assert answers[2]["parents"] == [identity(hosts[0], "pending")]
    for h in hosts:
        assert register(volt, h)[0] == 200
    # Every node below the top now has its tree parent and one standby parent.
    beat = raw(volt, "PUT", "/v1/members/heartbeat", hosts[6])[2]
    assert beat == [
        {
            "peer_id": f"{hosts[6]}:volume-image1",
            "parents": [identity(hosts[2]), identity(hosts[3])],
        }
    ]


def test_body_host_names_the_node(volt):
    """Host = the body's host when given (multi-NIC nodes), else the source address."""
    status, _, body = raw(
        volt, "GET", "/v1/volumes/query/volume-x", "127.0.0.31", {"host": "fd00::7"}
    )
    assert status == 200 and body == {"peer_id": "[fd00::7]:volume-x", "parents": []}
    path = "/v1/volumes/volume-x/[fd00::7]:volume-x"
    reg = {"host": "fd00::7", "port": 3260, "iqn": "iqn.2010-10.org.openstack:volume-x", "lun": 1}
    status, _, body = raw(volt, "POST", path, "127.0.0.31", reg)
    assert status == 200 and body["peer_id"] == "[fd00::7]:volume-x" and body["port"] == "3260"
    beat = raw(volt, "PUT", "/v1/members/heartbeat", "127.0.0.31", {"host": "fd00:0::7"})[2]
    assert beat == [{"peer_id": "[fd00::7]:volume-x", "parents": []}]


def test_bad_input_is_rejected_and_changes_nothing(volt):
    src = "127.0.0.41"
    assert raw(volt, "GET", "/v1/volumes/query/volume-x", src)[0] == 200
    before = raw(volt, "GET", "/v1/volumes/volume-x", src)[2]
    cases = [
        ("GET", "/v1/volumes/query/bad;name", None, "volume_id"),
        ("GET", "/v1/volumes/query/volume-x", {"host": "not a host"}, "host"),
        ("GET", "/v1/volumes/query/volume-x", {"color": "red"}, "color"),
        ("GET", "/v1/volumes/query/volume-x", {"peer_id": "127.0.0.9:volume-x"}, "peer_id"),
        (
            "POST",
            f"/v1/volumes/volume-x/{src}:volume-x",
            {"host": src, "port": "x", "iqn": IQN, "lun": 1},
            "port",
        ),
        (
            "POST",
            f"/v1/volumes/volume-x/{src}:volume-x",
            {"host": src, "port": 1, "iqn": "iqn.bad", "lun": 1},
            "iqn",
        ),
        (
            "POST",
            f"/v1/volumes/volume-x/{src}:volume-x",
            {"host": src, "port": 1, "iqn": IQN, "lun": -1},
            "lun",
        ),
        (
            "POST",
            f"/v1/volumes/volume-x/{src}:volume-x",
            {"host": src, "port": 1, "iqn": IQN},
            "lun",
        ),
        (
            "POST",
            f"/v1/volumes/volume-x/{src}:volume-y",
            {"host": src, "port": 1, "iqn": IQN, "lun": 1},
            "peer_id",
        ),
        ("DELETE", "/v1/volumes/volume-x/nocolon", None, "peer_id"),
        ("PUT", "/v1/members/heartbeat", {"host": ""}, "host"),
    ]
    for method, path, body, field in cases:
        status, _, answer = raw(volt, method, path, src, body)
        assert status == 400, (method, path, answer)
        error = answer["errors"][0]
        assert error["code"] == "volt.invalid_input" and repr(field) in error["detail"], error
    status, _, answer = raw(
        volt,
        "POST",
        "/v1/volumes/volume-x/127.0.0.99:volume-x",
        src,
        {"host": src, "port": 1, "iqn": IQN, "lun": 1},
    )
    assert status == 404 and answer["errors"][0]["code"] == "volt.peer.not_found"
    status, _, answer = raw(
        volt,
        "POST",
        f"/v1/volumes/volume-z/{src}:volume-z",
        src,
        {"host": src, "port": 1, "iqn": IQN, "lun": 1},
    )
    assert status == 404 and answer["errors"][0]["code"] == "volt.volume.not_found"
    status, _, answer = raw(
        volt, "DELETE", f"/v1/volumes/volume-x/{src}:volume-x", src, token=False
    )
    assert status == 401 and answer["errors"][0]["code"] == "volt.unauthenticated"
    status, _, answer = raw(volt, "PATCH", "/v1/volumes", src)
    assert status == 405 and answer["errors"][0]["code"] == "volt.method_not_allowed"
    assert raw(volt, "GET", "/v1/volumes/volume-x", src)[2] == before
    assert "Traceback" not in volt.log()


def test_nbd_port_extension_reaches_children_and_survives_a_restart(volt):
    """A relay that also exports NBD says so at registration; its children see ``nbd_port``
    in its identity (and nodes that did not register one keep the original's exact dict)."""
    a, top, b = "127.0.0.21", "127.0.0.23", "127.0.0.22"
    raw(volt, "GET", "/v1/volumes/query/volume-image1", a)
    raw(volt, "GET", "/v1/volumes/query/volume-image1", top)  # fills the image server's slots
    body = {"host": a, "port": "3260", "iqn": IQN, "lun": "1", "nbd_port": 10809}
    status, _, registered = raw(
        volt, "POST", f"/v1/volumes/volume-image1/{a}:volume-image1", a, body
    )
    assert status == 200
    assert registered == {**identity(a), "nbd_port": "10809", "parents": []}
    _, _, placed = raw(volt, "GET", "/v1/volumes/query/volume-image1", b)
    assert placed["parents"][0] == {**identity(a), "nbd_port": "10809"}
    volt.kill9()
    volt.start()
    _, _, beat = raw(volt, "PUT", "/v1/members/heartbeat", b)
    assert beat == [
        {"peer_id": f"{b}:volume-image1", "parents": [{**identity(a), "nbd_port": "10809"}]}
    ]
    bad = {**body, "nbd_port": "0"}
    status, _, error = raw(volt, "POST", f"/v1/volumes/volume-image1/{a}:volume-image1", a, bad)
    assert status == 400 and "nbd_port" in error["errors"][0]["detail"]
