"""``zvm_api_auth = peer-uid`` (virtman.zvm.peer): a loopback caller without a token is let in
only if the kernel says its socket belongs to one of ``zvm_api_peer_users`` -- what Nova's zvm
driver (which sends no token) needs. Real sockets on 127.0.0.1 and ::1; a caller running as
another user is a real child process (setuid nobody)."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from zvmconnector import connector

from tests.unit.fakes.guests import FakeGuests
from virtman.imageservice import ImageService
from virtman.zvm import service
from virtman.zvm.app import ZvmApi
from virtman.zvm.auth import TokenAuth
from virtman.zvm.images import Catalogue
from virtman.zvm.peer import PeerUids, resolve_uids, socket_owner
from virtman.zvm.server import ZvmServer
from virtman.zvm.store import Store

pytestmark = pytest.mark.unit
NOBODY = pwd.getpwnam("nobody").pw_uid
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody (the checkout's venv is not)


def serve(tmp_path: Path, peers: PeerUids | None, host: str = "127.0.0.1") -> ZvmServer:
    store = Store(tmp_path / "zvm.json")
    images = ImageService(None, None, "iqn.2010-10.org.openstack:", [tmp_path])  # type: ignore[arg-type]
    api = ZvmApi(
        FakeGuests(),
        Catalogue(store, images, lambda t: []),
        store,
        auth=TokenAuth("secret", 600),
        disk_dir=tmp_path,
        peers=peers,
    )
    server = ZvmServer((host, 0), api, connections=4, request_timeout=5.0)
    server.start()
    return server


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def test_the_kernel_names_the_owner_of_a_loopback_client_socket(
    listener: socket.socket,
) -> None:
    client = socket.create_connection(listener.getsockname())
    accepted, peer = listener.accept()
    try:
        server_end = accepted.getsockname()
        assert socket_owner(peer, server_end) == os.getuid()
        assert socket_owner((peer[0], peer[1] + 1 or 1), server_end) is None
    finally:
        accepted.close()
        client.close()


def nova_like_call(url_host: str, port: int, as_uid: int | None = None) -> dict[str, Any]:
    """guest_list as Nova's zvm driver sends it (ZVMConnector: no token), optionally from a
    child process running as ``as_uid``."""
    if as_uid is None:
        return connector.ZVMConnector(url_host, port).send_request("guest_list")
    code = (
        "import json, urllib.request, urllib.error\n"
        f"try:\n r = urllib.request.urlopen('http://{url_host}:{port}/guests', timeout=10)\n"
        " print(r.status, r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n print(e.code, e.read().decode())\n"
    )
    out = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        user=as_uid,
        cwd="/",
        check=True,
    ).stdout
    status, _, body = out.strip().partition(" ")
    import json

    return {"status": int(status), **json.loads(body)}


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a caller as nobody")
def test_peer_uid_lets_in_the_listed_user_only(tmp_path: Path) -> None:
    server = serve(tmp_path, PeerUids(frozenset({os.getuid()})))
    try:
        port = server.server_address[1]
        result = nova_like_call("127.0.0.1", port)
        assert (result["overallRC"], result["output"]) == (0, []), result
        other = nova_like_call("127.0.0.1", port, as_uid=NOBODY)
        assert (other["status"], other["overallRC"], other["rs"]) == (401, 400, 401), other
    finally:
        server.stop()
    server = serve(tmp_path, PeerUids(frozenset({NOBODY})))
    try:
        port = server.server_address[1]
        assert nova_like_call("127.0.0.1", port)["rs"] == 401  # root is not listed
        listed = nova_like_call("127.0.0.1", port, as_uid=NOBODY)
        assert (listed["status"], listed["output"]) == (200, []), listed
    finally:
        server.stop()


def test_peer_uid_over_ipv6_loopback(tmp_path: Path) -> None:
    server = serve(tmp_path, PeerUids(frozenset({os.getuid()})), host="::1")
    try:
        result = nova_like_call("[::1]", server.server_address[1])  # Nova: IPv4 only
        assert (result["overallRC"], result["output"]) == (0, []), result
    finally:
        server.stop()


def test_token_only_by_default_and_still_accepted_with_peer_uid(tmp_path: Path) -> None:
    server = serve(tmp_path, None)
    try:
        assert nova_like_call("127.0.0.1", server.server_address[1])["rs"] == 401
    finally:
        server.stop()
    server = serve(tmp_path, PeerUids(frozenset({NOBODY + 1})))
    try:
        import requests

        answer = requests.get(f"{server.url}/guests", headers={"X-Auth-Token": "secret"}, timeout=5)
        assert answer.status_code == 200 and answer.json()["output"] == []
    finally:
        server.stop()


def conf(**values: Any) -> SimpleNamespace:
    defaults = {
        "zvm_api_auth": "peer-uid",
        "zvm_api_listen_host": "127.0.0.1",
        "zvm_api_peer_users": ["nobody", "0"],
    }
    return SimpleNamespace(**{**defaults, **values})


def test_peer_uid_configuration_is_checked() -> None:
    assert service.peer_auth(conf(zvm_api_auth="token")) is None
    peers = service.peer_auth(conf())
    assert peers is not None and peers.uids == {NOBODY, 0}
    with pytest.raises(ValueError, match="needs zvm_api_listen_host on loopback"):
        service.peer_auth(conf(zvm_api_listen_host="0.0.0.0"))
    with pytest.raises(ValueError, match="needs zvm_api_peer_users"):
        service.peer_auth(conf(zvm_api_peer_users=[]))
    with pytest.raises(ValueError, match="no user 'no-such-user-x'"):
        resolve_uids(["no-such-user-x"])
    assert service.peer_auth(conf(zvm_api_listen_host="::1")) is not None
