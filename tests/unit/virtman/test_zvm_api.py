"""The z/VM-shaped API (virtman.zvm) driven by the connector's own client, ``zvmconnector``
(zVMCloudConnector 1.6.3 from PyPI), against the real app and HTTP server on 127.0.0.1, with
a fake guest manager (tests/unit/fakes/guests.py) and a fake tgt behind the real
ImageService. Every body the client sends is checked against the connector's jsonschema."""

from __future__ import annotations

import functools
import http.server
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from zvmconnector import connector, restclient
from zvmsdk.sdkwsgi.schemas import guest as guest_schemas
from zvmsdk.sdkwsgi.schemas import image as image_schemas
from zvmsdk.sdkwsgi.validation import _SchemaValidator

from brick.wait import wait_until
from tests.unit.fakes.guests import FakeGuests
from virtman.errors import GuestStateError
from virtman.guest.domains import VirtualMachines, VMError
from virtman.imageservice import ImageService
from virtman.zvm.app import ZvmApi
from virtman.zvm.auth import TokenAuth
from virtman.zvm.images import Catalogue
from virtman.zvm.routes import match
from virtman.zvm.server import ZvmServer
from virtman.zvm.store import Store

TOKEN = "zvm-test-secret"
ENVELOPE = {"overallRC", "rc", "rs", "modID", "output", "errmsg"}


class FakeTgt:
    def __init__(self) -> None:
        self.created: list[tuple[str, Path]] = []
        self.readers: dict[str, list[str]] = {}  # iqn -> initiator addresses

    def targets(self) -> list[Any]:
        return [
            SimpleNamespace(iqn=iqn, tid=i + 1, luns=[SimpleNamespace(backing_path=str(p))])
            for i, (iqn, p) in enumerate(self.created)
        ]

    def create_target(self, iqn: str, path: Path, **_: Any) -> int:
        self.created.append((iqn, path))
        return len(self.created)

    def delete_target(self, iqn: str) -> None:
        self.created = [(i, p) for i, p in self.created if i != iqn]

    def connections(self, iqn: str) -> list[Any]:
        return [SimpleNamespace(address=a) for a in self.readers.get(iqn, [])]


class Recorder:
    """WSGI middleware keeping (method, path, query, parsed body) of every request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str, str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        import io

        environ["wsgi.input"] = io.BytesIO(raw)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.seen.append(
            (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["QUERY_STRING"], body)
        )
        return self.app(environ, start_response)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SimpleNamespace]:
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    (images / "base.raw").write_bytes(b"\x01" * 8192)
    (outside / "secret.raw").write_bytes(b"s" * 4096)
    tgt = FakeTgt()
    service = ImageService(tgt, None, "iqn.2010-10.org.openstack:", [images])  # type: ignore[arg-type]
    instances: dict[str, str] = {}  # instance -> image target (what Virtman.list says)
    store = Store(tmp_path / "state" / "zvm.json")
    catalogue = Catalogue(
        store, service, lambda target: sorted(i for i, t in instances.items() if t == target)
    )
    guests = FakeGuests()
    guests.capture_service = service
    api = ZvmApi(
        guests, catalogue, store, auth=TokenAuth(TOKEN, 600), disk_dir=tmp_path, bridge="br-vmt"
    )
    recorder = Recorder(api)
    server = ZvmServer(("127.0.0.1", 0), recorder, connections=4, request_timeout=2.0)
    server.start()
    token_file = tmp_path / "token.dat"
    token_file.write_text(TOKEN + "\n")
    port = server.server_address[1]
    client = restclient.RESTClient("127.0.0.1", port, token_path=str(token_file), auth="token")
    try:
        yield SimpleNamespace(
            api=api,
            guests=guests,
            tgt=tgt,
            store=store,
            instances=instances,
            images=images,
            outside=outside,
            recorder=recorder,
            server=server,
            url=server.url,
            call=client.call,
            tmp=tmp_path,
        )
    finally:
        server.stop()


def ok(result: dict[str, Any]) -> Any:
    assert set(result) == ENVELOPE, result
    assert (result["overallRC"], result["rc"], result["rs"], result["errmsg"]) == (0, 0, 0, ""), (
        result
    )
    return result["output"]


def codes(result: dict[str, Any]) -> tuple[int, int, int, int | None]:
    assert set(result) >= ENVELOPE, result
    assert result["errmsg"], result
    return result["overallRC"], result["rc"], result["rs"], result["modID"]


# -- the connector's own schemas for what its client sends --------------------------------------
def schema_for(method: str, path: str, body: Any) -> dict[str, Any] | None:
    handlers, _ = match(path)
    assert handlers is not None, path
    if method == "POST" and path == "/guests":
        return guest_schemas.create
    if path.endswith("/action"):
        return {
            "deploy": guest_schemas.deploy,
            "capture": guest_schemas.capture,
            "start": guest_schemas.start,
            "stop": guest_schemas.stop,
            "softstop": guest_schemas.softstop,
        }.get(body["action"])
    if path.endswith("/interface"):
        return {
            "POST": guest_schemas.create_network_interface,
            "DELETE": guest_schemas.delete_network_interface,
        }[method]
    if path.endswith("/disks") and method == "PUT":
        return guest_schemas.config_minidisks
    if path.endswith("/nic") and method == "POST":
        return guest_schemas.create_nic
    if path == "/images" and method == "POST":
        return image_schemas.create
    if path.startswith("/images/") and method == "PUT":
        return image_schemas.export
    return None


def assert_bodies_valid(seen: list[tuple[str, str, str, Any]]) -> int:
    """Validate every recorded body that has a schema; return how many were checked."""
    checked = 0
    for method, path, _query, body in seen:
        schema = schema_for(method, path, body)
        if schema is None:
            continue
        if path.endswith("/action"):
            body = {k: v for k, v in body.items() if k != "action"}
        _SchemaValidator(schema).validate(body)  # raises the connector's ValidationError
        checked += 1
    return checked


# -- tests ------------------------------------------------------------------------------------
def test_every_guest_verb_through_zvmconnector(node: SimpleNamespace) -> None:
    call = node.call
    assert (
        ok(
            call(
                "image_import",
                "cirros",
                f"file://{node.images}/base.raw",
                {"os_version": "rhel8.4"},
            )
        )
        is None
    )
    assert ok(call("guest_list")) == []
    # Nova's root_gb = 0: the size is image_get_root_disk_size's answer (512-byte blocks)
    blocks = ok(call("image_get_root_disk_size", "cirros"))
    ok(call("guest_create", "vm0", 1, 128, disk_list=[{"size": blocks, "is_boot_disk": True}]))
    assert node.guests.calls[-1] == ("create", "VM0", 1, 128, 1)
    ok(call("guest_delete", "vm0"))
    out = ok(
        call(
            "guest_create",
            "vm1",
            2,
            512,
            disk_list=[{"size": "3g", "is_boot_disk": True}],
            user_profile="osdflt",
        )
    )
    assert out == {"userid": "VM1", "vcpus": 2, "memory": 512, "disk_gb": 3}
    assert node.guests.calls[-1] == ("create", "VM1", 2, 512, 3)
    assert ok(call("guest_list")) == ["VM1"]
    assert ok(call("host_get_guest_list")) == ["VM1"]
    assert ok(call("guest_get_power_state", "vm1")) == "off"
    ok(
        call(
            "guest_config_minidisks",
            "vm1",
            [{"vdev": "0101", "format": "ext4", "mntdir": "/mnt/d"}],
        )
    )
    nics = ok(
        call(
            "guest_create_network_interface",
            "vm1",
            "rhel8.4",
            [
                {
                    "ip_addr": "192.168.95.10",
                    "cidr": "192.168.95.0/24",
                    "mac_addr": "02:00:00:00:00:01",
                }
            ],
        )
    )
    assert nics == {
        "1000": {
            "ip_addr": "192.168.95.10",
            "cidr": "192.168.95.0/24",
            "mac_addr": "02:00:00:00:00:01",
            "vdev": "1000",
            "bridge": "br-vmt",
        }
    }
    assert ok(call("guest_create_nic", "vm1", vdev="2000", nic_id="port-1")) == "2000"
    rows = ok(call("guests_get_nic_info", userid="vm1"))
    assert [(r["userid"], r["interface"], r["switch"]) for r in rows] == [
        ("VM1", "1000", "br-vmt"),
        ("VM1", "2000", "br-vmt"),
    ]
    assert [
        a["adapter_address"] for a in ok(call("guest_get_adapters_info", "vm1"))["adapters"]
    ] == [
        "1000",
        "2000",
    ]
    ok(call("guest_delete_nic", "vm1", "2000"))
    ok(
        call(
            "guest_deploy",
            "vm1",
            "cirros",
            transportfiles="/tmp/cfg.iso",
            remotehost="nova@10.0.0.1",
        )
    )
    assert node.guests.calls[-1] == ("deploy", "VM1", "cirros")
    ok(call("guest_start", "vm1"))
    assert ok(call("guest_get_power_state", "vm1")) == "on"
    assert ok(call("guest_get_power_state_real", "vm1")) == "on"
    info = ok(call("guest_get_info", "vm1"))
    assert info == {
        "power_state": "on",
        "max_mem_kb": 512 * 1024,
        "mem_kb": 512 * 1024,
        "num_cpu": 2,
        "cpu_time_us": 1234,
    }
    assert "  <vcpu>2</vcpu>" in ok(call("guest_get_definition_info", "vm1"))["user_direct"]
    assert "  <vcpu>2</vcpu>" in ok(call("guest_get_user_direct", "vm1"))["user_direct"]
    stats = ok(call("guest_inspect_stats", "vm1"))
    assert set(stats["VM1"]) == {"cpu", "mem", "nics"}
    assert ok(call("guest_inspect_vnics", ["vm1"]))["VM1"][0]["rx_bytes"] == 10
    ok(call("guest_pause", "vm1"))
    assert ok(call("guest_get_power_state", "vm1")) == "paused"
    ok(call("guest_unpause", "vm1"))
    ok(call("guest_reboot", "vm1"))
    ok(call("guest_reset", "vm1"))
    assert "VM1 booted from cirros" in ok(call("guest_get_console_output", "vm1"))
    ok(call("guest_softstop", "vm1", timeout=30, poll_interval=5))
    assert node.guests.calls[-1] == ("softstop", "VM1", 30.0, 5.0)
    ok(call("guest_start", "vm1", timeout=10))
    ok(call("guest_stop", "vm1", timeout=10, poll_interval=1))
    assert ok(call("guest_get_power_state", "vm1")) == "off"
    ok(call("guest_delete_network_interface", "vm1", "rhel8.4", "1000"))
    assert node.store.get("nics", "VM1") is None
    ok(call("guest_create_nic", "vm1"))
    ok(call("guest_delete", "vm1"))
    assert ok(call("guest_list")) == []
    assert node.store.get("nics", "VM1") is None  # a deleted guest's NICs go with it
    host = ok(call("host_get_info"))
    assert len(host) == 12 and host["hypervisor_type"] == "kvm"
    assert set(ok(call("host_diskpool_get_info", disk_pool="ECKD:POOL1"))) == {
        "disk_total",
        "disk_used",
        "disk_available",
    }
    assert ok(call("version"))["version"] == "1.6.3"
    assert assert_bodies_valid(node.recorder.seen) >= 12


def test_image_verbs(node: SimpleNamespace) -> None:
    import hashlib

    call = node.call
    digest = hashlib.md5(b"\x01" * 8192, usedforsecurity=False).hexdigest()
    url = f"file://{node.images}/base.raw"
    assert (
        ok(call("image_import", "img1", url, {"os_version": "ubuntu22", "md5sum": digest})) is None
    )
    assert node.tgt.created == [("iqn.2010-10.org.openstack:volume-img1", node.images / "base.raw")]
    [record] = ok(call("image_query", imagename="img1"))
    assert record["imagename"] == "img1"
    assert record["imageosdistro"] == "ubuntu22"
    assert record["md5sum"] == digest
    assert record["disk_size_units"] == "16:BLK"
    assert record["image_size_in_bytes"] == "8192"
    assert [r["imagename"] for r in ok(call("image_query"))] == ["img1"]
    # an unknown name is the connector's not-found (Nova's spawn imports the image on it)
    assert codes(call("image_query", imagename="nothere")) == (404, 404, 1, 40)
    assert ok(call("image_get_root_disk_size", "img1")) == "16"
    # the same name twice: the connector's "already exist" (300/300/13, HTTP 409)
    assert codes(call("image_import", "img1", url, {"os_version": "rhel8"})) == (300, 300, 13, 40)
    out = ok(call("image_export", "img1", f"file://{node.images}/copy.raw"))
    assert out["image_path"] == str(node.images / "copy.raw")
    assert (node.images / "copy.raw").read_bytes() == b"\x01" * 8192
    # export never overwrites, never leaves image_dirs
    assert codes(call("image_export", "img1", f"file://{node.images}/copy.raw"))[:3] == (
        400,
        400,
        400,
    )
    assert codes(call("image_export", "img1", f"file://{node.outside}/x.raw"))[:3] == (
        400,
        400,
        400,
    )
    assert not (node.outside / "x.raw").exists()
    # in use by an instance of this node: refused, nothing removed
    node.instances["vm9"] = "volume-img1"
    result = call("image_delete", "img1")
    assert codes(result) == (409, 409, 1, 40) and "vm9" in result["errmsg"]
    assert len(node.tgt.created) == 1
    del node.instances["vm9"]
    ok(call("image_delete", "img1"))
    assert node.tgt.created == [] and ok(call("image_query")) == []
    assert (node.images / "base.raw").exists()  # the operator's file stays
    for verb, args in [
        ("image_delete", ("img1",)),
        ("image_get_root_disk_size", ("img1",)),
        ("image_export", ("img1", f"file://{node.images}/y.raw")),
    ]:
        assert codes(call(verb, *args)) == (404, 404, 1, 40), verb
    assert assert_bodies_valid(node.recorder.seen) >= 4


def test_import_refuses_files_outside_image_dirs(node: SimpleNamespace) -> None:
    call = node.call
    for url in (
        f"file://{node.outside}/secret.raw",
        f"file://{node.images}/../outside/secret.raw",
        "http://127.0.0.1:1/img.raw",
        f"file://{node.images}/missing.raw",
    ):
        result = call("image_import", "leak", url, {"os_version": "rhel8"})
        assert codes(result)[:3] == (400, 400, 400), (url, result)
        assert "Validation error" in result["errmsg"]
    assert node.tgt.created == [] and ok(call("image_query")) == []
    wrong_md5 = {"os_version": "rhel8", "md5sum": "0" * 32}
    result = call("image_import", "img2", f"file://{node.images}/base.raw", wrong_md5)
    assert codes(result)[:3] == (400, 400, 400) and "md5sum" in result["errmsg"]
    assert node.tgt.created == []


def test_export_to_this_host_is_local_to_another_not_supported(node: SimpleNamespace) -> None:
    """Nova's zvm snapshot exports with ``remote_host=<user>@<my_ip>``: this host's address
    is a local export; another host's is the connector's 501, nothing written."""
    call = node.call
    ok(call("image_import", "img1", f"file://{node.images}/base.raw", {"os_version": "rhel8"}))
    dest = node.images / "nova-tmp.raw"
    out = ok(call("image_export", "img1", f"file://{dest}", remote_host="nova@127.0.0.1"))
    assert out["image_path"] == str(dest) and dest.read_bytes() == b"\x01" * 8192
    elsewhere = node.images / "elsewhere.raw"
    result = call("image_export", "img1", f"file://{elsewhere}", remote_host="nova@192.0.2.1")
    assert codes(result) == (501, 501, 1, 40) and "remote_host" in result["errmsg"]
    assert not elsewhere.exists()


def test_nics_reach_the_guest_manager_on_the_bridge(node: SimpleNamespace) -> None:
    """Every NIC verb hands the guest's whole NIC list to the guest manager (the domain's
    interfaces on ``zvm_bridge``); a NIC without a MAC gets a fixed one; a MAC taken or a
    manager that refuses: nothing recorded."""
    call = node.call
    ok(call("guest_create", "vm1", 1, 128))
    assert ok(call("guest_create_nic", "vm1", active=True)) == "1000"
    [nic] = node.guests.nics["VM1"]
    assert nic["vdev"] == "1000" and nic["bridge"] == "br-vmt"
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", nic["mac_addr"]), nic
    assert node.guests.calls[-1] == ("set_nics", "VM1", ["1000"], True)
    net = {"ip_addr": "192.168.95.7", "cidr": "192.168.95.0/24", "mac_addr": nic["mac_addr"]}
    result = call("guest_create_network_interface", "vm1", "rhel8", [net])
    assert codes(result)[:3] == (400, 400, 400) and "mac_addr" in result["errmsg"]

    def refuse(userid: str, nics: list[dict[str, Any]], *, live: bool = False) -> None:
        raise GuestStateError(userid, "libvirt refused the NIC")

    node.guests.set_nics = refuse  # type: ignore[method-assign]
    result = call("guest_create_nic", "vm1", mac_addr="02:00:00:00:00:02")
    assert codes(result)[:2] == (409, 409) and "refused" in result["errmsg"]
    assert list(node.store.get("nics", "VM1")) == ["1000"]  # nothing recorded
    result = call("guest_delete_nic", "vm1", "1000")
    assert codes(result)[:2] == (409, 409) and "refused" in result["errmsg"]
    assert list(node.store.get("nics", "VM1")) == ["1000"]  # nor removed


class WebHandler(http.server.SimpleHTTPRequestHandler):
    """Serves its folder; ``/to-file`` and ``/to-ftp`` redirect out of http."""

    REDIRECTS = {"/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/x.raw"}

    def do_GET(self) -> None:
        if self.path in self.REDIRECTS:
            self.send_response(302)
            self.send_header("Location", self.REDIRECTS[self.path])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[SimpleNamespace]:
    served = tmp_path / "web"
    served.mkdir()
    (served / "disk.raw").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    handler = functools.partial(WebHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", files=served)
    finally:
        server.shutdown()
        server.server_close()


def test_import_from_an_http_url_fetches_a_new_file(node: SimpleNamespace, web) -> None:
    import hashlib

    node.api.catalogue.url_prefixes = (web.url + "/",)
    call = node.call
    data = (web.files / "disk.raw").read_bytes()
    meta = {"os_version": "rhel8", "md5sum": hashlib.md5(data, usedforsecurity=False).hexdigest()}
    ok(call("image_import", "web1", f"{web.url}/disk.raw", meta))
    fetched = node.images / "volume-web1.raw"
    assert fetched.read_bytes() == data and fetched.stat().st_mode & 0o777 == 0o444
    assert node.tgt.created == [("iqn.2010-10.org.openstack:volume-web1", fetched)]
    [record] = ok(call("image_query", imagename="web1"))
    assert record["image_size_in_bytes"] == str(len(data))
    assert [p.name for p in node.images.iterdir() if p.name.startswith(".")] == []
    ok(call("image_delete", "web1"))
    assert not fetched.exists()  # this node made the file: it goes with the image


@pytest.mark.parametrize(
    ("path", "meta", "why"),
    [
        ("/disk.raw", {"md5sum": "0" * 32}, "md5sum"),
        ("/missing.raw", {}, "answered 404"),
        ("/to-file", {}, "file:///etc/passwd"),  # a redirect out of http(s)
        ("/to-ftp", {}, "redirects to ftp://127.0.0.1/x.raw: not http(s)"),
        ("/disk.raw", {"limit": 4096}, "more than 4096"),
    ],
)
def test_a_failed_url_import_leaves_nothing(node: SimpleNamespace, web, path, meta, why) -> None:
    node.api.catalogue.url_prefixes = (web.url,)
    if "limit" in meta:
        node.api.catalogue.max_import_bytes = meta.pop("limit")
    before = sorted(p.name for p in node.images.iterdir())
    result = node.call("image_import", "web2", web.url + path, {"os_version": "rhel8", **meta})
    assert codes(result)[:3] == (400, 400, 400) and why in result["errmsg"], result
    assert sorted(p.name for p in node.images.iterdir()) == before
    assert node.tgt.created == [] and ok(node.call("image_query")) == []


def test_url_imports_only_from_the_listed_prefixes(node: SimpleNamespace, web) -> None:
    """No prefixes (the default): no URL import at all; with prefixes: only below them, at a
    ``/`` boundary, redirects included; nothing fetched, exported or recorded otherwise."""
    before = sorted(p.name for p in node.images.iterdir())
    refused = node.call("image_import", "web4", f"{web.url}/disk.raw", {"os_version": "rhel8"})
    assert codes(refused)[:3] == (400, 400, 400), refused
    assert "zvm_image_import_url_prefixes is empty" in refused["errmsg"], refused
    node.api.catalogue.url_prefixes = (web.url + "/pub",)
    (web.files / "pub").mkdir()
    (web.files / "pubx.raw").write_bytes(b"x" * 512)
    for path, why in (
        ("/disk.raw", "not under any of zvm_image_import_url_prefixes"),
        ("/pubx.raw", "not under any of zvm_image_import_url_prefixes"),
        ("/pub/../disk.raw", "must not have . or .. path segments"),  # a server resolves it
        ("/pub/%2e%2e/disk.raw", "must not have . or .. path segments"),
    ):
        result = node.call("image_import", "web4", web.url + path, {"os_version": "rhel8"})
        assert codes(result)[:3] == (400, 400, 400) and why in result["errmsg"], (path, result)
    WebHandler.REDIRECTS["/pub/out"] = f"{web.url}/disk.raw"
    try:
        result = node.call("image_import", "web4", f"{web.url}/pub/out", {"os_version": "rhel8"})
    finally:
        del WebHandler.REDIRECTS["/pub/out"]
    assert "not under an allowed prefix" in result["errmsg"], result
    assert sorted(p.name for p in node.images.iterdir()) == before
    assert node.tgt.created == [] and ok(node.call("image_query")) == []


def test_other_url_schemes_are_refused_naming_the_url(node: SimpleNamespace) -> None:
    for url in ("ftp://127.0.0.1/x.raw", "http:///x.raw", "https://127.0.0.1/x#y", "x.raw"):
        result = node.call("image_import", "web3", url, {"os_version": "rhel8"})
        assert codes(result)[:3] == (400, 400, 400) and "url" in result["errmsg"], (url, result)
    assert node.tgt.created == []


def test_token_handshake(node: SimpleNamespace) -> None:
    # no token at all (the plain ZVMConnector never asks for one): 401 in the envelope
    port = node.server.server_address[1]
    plain = connector.ZVMConnector("127.0.0.1", port)
    assert codes(plain.send_request("guest_list")) == (400, 400, 401, 120)
    # a wrong admin token gets no X-Auth-Token: the client reports its own error
    bad = node.tmp / "bad.dat"
    bad.write_text("wrong")
    client = restclient.RESTClient("127.0.0.1", port, token_path=str(bad), auth="token")
    result = client.call("guest_list")
    assert (result["overallRC"], result["rs"]) == (101, 3) and "401" in result["errmsg"]
    answer = requests.post(f"{node.url}/token", headers={"X-Admin-Token": TOKEN}, timeout=5)
    token = answer.headers["X-Auth-Token"]
    assert token.startswith("vmt1.") and TOKEN not in token
    listed = requests.get(f"{node.url}/guests", headers={"X-Auth-Token": token}, timeout=5)
    assert listed.json()["output"] == [] and listed.status_code == 200
    forged = token[:-1] + ("0" if token[-1] != "0" else "1")
    refused = requests.get(f"{node.url}/guests", headers={"X-Auth-Token": forged}, timeout=5)
    assert refused.status_code == 401 and refused.json()["rs"] == 401
    # api_token itself is accepted, as XML-RPC callers send it
    direct = requests.get(f"{node.url}/guests", headers={"X-Auth-Token": TOKEN}, timeout=5)
    assert direct.status_code == 200


def test_issued_tokens_expire() -> None:
    now = [1000.0]
    auth = TokenAuth("secret", ttl_s=60, clock=lambda: now[0])
    assert auth.issue("nope") is None and auth.issue(None) is None
    token = auth.issue("secret")
    assert token is not None and auth.check(token)
    now[0] += 61
    assert not auth.check(token)
    assert not TokenAuth("other", 60, clock=lambda: 1000.0).check(token)
    assert not auth.check("") and not auth.check("vmt1.x.y.z")


def test_noauth_answers_token_without_admin_token(tmp_path: Path) -> None:
    store = Store(tmp_path / "zvm.json")
    service = ImageService(FakeTgt(), None, "iqn.2010-10.org.openstack:", [tmp_path])  # type: ignore[arg-type]
    api = ZvmApi(
        FakeGuests(), Catalogue(store, service, lambda t: []), store, auth=None, disk_dir=tmp_path
    )
    server = ZvmServer(("127.0.0.1", 0), api)
    server.start()
    try:
        plain = connector.ZVMConnector("127.0.0.1", server.server_address[1])
        assert ok(plain.send_request("guest_list")) == []
        answer = requests.post(f"{server.url}/token", timeout=5)
        assert answer.headers["X-Auth-Token"] == "server-auth-closed"
    finally:
        server.stop()


BAD_REQUESTS: list[tuple[str, str, Any, str]] = [
    ("POST", "/guests", {"guest": {"userid": "toolonguser", "vcpus": 1, "memory": 512}}, "userid"),
    ("POST", "/guests", {"guest": {"userid": "vm-1", "vcpus": 1, "memory": 512}}, "userid"),
    ("POST", "/guests", {"guest": {"userid": "vm1", "vcpus": 0, "memory": 512}}, "vcpus"),
    ("POST", "/guests", {"guest": {"userid": "vm1", "vcpus": True, "memory": 512}}, "vcpus"),
    ("POST", "/guests", {"guest": {"userid": "vm1", "vcpus": 1, "memory": "1e9"}}, "memory"),
    ("POST", "/guests", {"guest": {"userid": "vm1", "vcpus": 1}}, "required"),
    ("POST", "/guests", {"guest": {"userid": "vm1", "vcpus": 1, "memory": 1, "x": 1}}, "unknown"),
    (
        "POST",
        "/guests",
        {"guest": {"userid": "vm1", "vcpus": 1, "memory": 1, "disk_list": [{"size": "lots"}]}},
        "size",
    ),
    ("POST", "/guests", [1, 2], "JSON object"),
    (
        "POST",
        "/guests",
        {"guest": {"userid": "vm1", "vcpus": 1, "memory": 1, "max_mem": "64T"}},
        "max_mem",
    ),
    ("POST", "/guests/VM1/action", {"action": "explode"}, "unknown action"),
    ("POST", "/guests/VM1/action", {"action": "start", "rm": "-rf"}, "unknown"),
    ("POST", "/guests/VM1/action", {"action": "softstop", "timeout": -1}, "timeout"),
    ("POST", "/guests/VM1/action", {"action": "softstop", "timeout": 10**9}, "timeout"),
    ("POST", "/guests/VM1/action", {"action": "deploy"}, "required"),
    ("POST", "/guests/VM1/action", {"action": "deploy", "image": "../../etc"}, "image_name"),
    ("POST", "/guests/VM_1/action", {"action": "start"}, "userid"),
    ("POST", "/guests/VM1/action", {"action": "stop", "userid": "VM2"}, "differs"),
    ("GET", "/guests/stats?userid=a;b", None, "userid"),
    ("GET", "/guests?x=1", None, "unknown parameters"),
    ("GET", "/guests/VM1/info", {"surprise": 1}, "no body"),
    ("PUT", "/guests/VM1/disks", {"disk_info": {"disk_list": [{"format": "ntfs"}]}}, "format"),
    (
        "POST",
        "/guests/VM1/interface",
        {"interface": {"os_version": "rhel8", "guest_networks": [{"ip_addr": "300.1.1.1"}]}},
        "ip_addr",
    ),
    (
        "POST",
        "/guests/VM1/interface",
        {"interface": {"os_version": "rhel8", "guest_networks": [{"mac_addr": "zz"}]}},
        "mac_addr",
    ),
    ("POST", "/guests/VM1/nic", {"nic": {"vdev": "12345"}}, "vdev"),
    ("DELETE", "/guests/VM1/nic/xyz!", None, "vdev"),
    (
        "POST",
        "/images",
        {"image": {"image_name": "a b", "url": "file:///x", "image_meta": {"os_version": "rhel8"}}},
        "image_name",
    ),
    (
        "POST",
        "/images",
        {"image": {"image_name": "ok", "url": "ftp://x/y", "image_meta": {"os_version": "rhel8"}}},
        "file:///",
    ),
    (
        "POST",
        "/images",
        {"image": {"image_name": "ok", "url": "file:///x", "image_meta": {}}},
        "required",
    ),
    ("PUT", "/images/img1", {"location": {"dest_url": "file://host/x"}}, "dest_url"),
    ("GET", "/images?imagename=..", None, "image_name"),
    ("GET", "/host/diskpool?poolname=;rm", None, "poolname"),
]


@pytest.mark.parametrize(("method", "path", "body", "why"), BAD_REQUESTS)
def test_bad_input_is_refused_with_nothing_changed(
    node: SimpleNamespace, method: str, path: str, body: Any, why: str
) -> None:
    node.guests.create("VM1", vcpus=1, memory_mb=256)
    node.guests.calls.clear()
    before = (json.dumps(node.store.all("images")), json.dumps(node.store.all("nics")))
    answer = requests.request(
        method,
        node.url + path,
        data=None if body is None else json.dumps(body),
        headers={"X-Auth-Token": TOKEN, "Content-Type": "application/json"},
        timeout=5,
    )
    result = answer.json()
    assert answer.status_code == 400, result
    assert codes(result) == (400, 400, 400, 120)
    assert why in result["errmsg"], result
    assert node.guests.calls == []
    assert node.guests.list() == ["VM1"]
    assert (json.dumps(node.store.all("images")), json.dumps(node.store.all("nics"))) == before
    assert node.tgt.created == []


def test_malformed_and_misrouted_requests(node: SimpleNamespace) -> None:
    headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/json"}
    answer = requests.post(f"{node.url}/guests", data=b"{not json", headers=headers, timeout=5)
    assert answer.status_code == 400 and "Malformed JSON" in answer.json()["errmsg"]
    answer = requests.get(f"{node.url}/nowhere", headers=headers, timeout=5)
    assert answer.status_code == 404 and codes(answer.json()) == (400, 400, 404, 120)
    answer = requests.put(f"{node.url}/guests", headers=headers, timeout=5)
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET, POST"
    big = b"{" + b" " * (2 << 20) + b"}"
    answer = requests.post(f"{node.url}/guests", data=big, headers=headers, timeout=5)
    assert answer.status_code == 413


def test_unknown_guest_is_the_connectors_not_found(node: SimpleNamespace) -> None:
    for verb, args in [
        ("guest_start", ("nobody",)),
        ("guest_get_power_state", ("nobody",)),
        ("guest_get_info", ("nobody",)),
        ("guest_delete", ("nobody",)),
        ("guest_get_console_output", ("nobody",)),
        ("guest_config_minidisks", ("nobody", [])),
        ("guest_create_network_interface", ("nobody", "rhel8", [])),
    ]:
        assert codes(node.call(verb, *args)) == (404, 404, 1, 10), verb
    ok(node.call("guest_create", "vm2", 1, 128))
    assert codes(node.call("guest_create", "VM2", 1, 128)) == (409, 409, 1, 10)
    # a guest without a disk cannot start: conflict, not a crash
    result = node.call("guest_start", "vm2")
    assert codes(result) == (409, 409, 1, 10) and "deploy" in result["errmsg"]
    # deploy of an image never imported: the image's not-found code, nothing deployed
    assert codes(node.call("guest_deploy", "vm2", "ghost")) == (404, 404, 1, 40)
    assert ("deploy", "VM2", "ghost") not in node.guests.calls
    assert codes(node.call("guest_delete_nic", "vm2", "1000")) == (404, 404, 1, 20)


def test_not_supported_verbs_answer_the_connectors_501(node: SimpleNamespace) -> None:
    ok(node.call("guest_create", "vm3", 1, 128))
    for verb, args, kwargs, mod in [
        ("guest_live_migrate", ("vm3", "d", "h", {}, "move"), {}, 10),
        ("guest_resize_cpus", ("vm3", 2), {}, 10),
        ("guest_create_disks", ("vm3", [{"size": "1g"}]), {}, 10),
        ("guest_delete_disks", ("vm3", ["0101"]), {}, 10),
        ("guest_nic_couple_to_vswitch", ("vm3", "1000", "vsw1"), {}, 20),
        ("vswitch_get_list", (), {}, 20),
        ("vswitch_create", ("vsw1",), {}, 20),
        ("volume_attach", ({"assigner_id": "vm3"},), {}, 30),
        ("get_volume_connector", ("vm3",), {}, 30),
        ("host_get_diskpool_volumes", (), {}, 10),
        ("file_export", ("/etc/passwd",), {}, 60),
    ]:
        result = node.call(verb, *args, **kwargs)
        assert codes(result) == (501, 501, 1, mod), (verb, result)
        assert "not been implemented" in result["errmsg"]
    assert node.guests.calls == [("create", "VM3", 1, 128, 0)]


def test_without_a_guest_manager(tmp_path: Path) -> None:
    store = Store(tmp_path / "zvm.json")
    service = ImageService(FakeTgt(), None, "iqn.2010-10.org.openstack:", [tmp_path])  # type: ignore[arg-type]
    api = ZvmApi(None, Catalogue(store, service, lambda t: []), store, auth=None, disk_dir=tmp_path)
    from virtman.zvm.host import HOST_INFO_KEYS, local_host_info

    api.host_info = lambda: local_host_info(api.diskpool)
    server = ZvmServer(("127.0.0.1", 0), api)
    server.start()
    try:
        client = connector.ZVMConnector("127.0.0.1", server.server_address[1])
        assert codes(client.send_request("guest_list")) == (501, 501, 1, 10)
        host = ok(client.send_request("host_get_info"))
        assert tuple(host) == HOST_INFO_KEYS and host["memory_mb"] > 0
    finally:
        server.stop()


def test_libvirt_unreachable_is_a_clear_connector_error(
    node: SimpleNamespace, tmp_path: Path
) -> None:
    """The real backend asks libvirt: its absence is the connector's 503 naming libvirt and
    the URI, not an internal error with a bare errno text."""
    uri = f"qemu+unix:///system?socket={tmp_path}/no-libvirt-sock"
    vms = VirtualMachines(uri)
    node.guests.host_info = lambda: vms.connection()
    result = node.call("host_get_info")
    assert codes(result) == (503, 503, 2, 10), result
    assert result["errmsg"].startswith(f"Guest manager unavailable: libvirt at {uri} unreachable: ")

    def broken() -> None:
        raise VMError("guest VM1: start: internal error")

    node.guests.host_info = broken
    result = node.call("host_get_info")
    assert codes(result) == (500, 500, 2, 10) and "libvirt failed: guest VM1" in result["errmsg"]


def test_connections_are_bounded(node: SimpleNamespace) -> None:
    node.server.stop()
    api = node.api
    server = ZvmServer(("127.0.0.1", 0), api, connections=1, request_timeout=1.0)
    server.start()
    try:
        host, port = server.server_address[:2]
        idle = socket.create_connection((host, port))  # says nothing: holds the only slot
        wait_until(lambda: server.slots._value == 0, timeout_s=5, what="the slot taken")  # type: ignore[attr-defined]
        answer = requests.get(f"{server.url}/guests", headers={"X-Auth-Token": TOKEN}, timeout=5)
        assert answer.status_code == 503 and answer.json()["overallRC"] == 503
        started = time.monotonic()
        assert idle.recv(1) == b""  # closed at request_timeout, the slot freed
        assert time.monotonic() - started < 3
        idle.close()
        # the server frees the slot just after closing the socket: the client may see EOF first
        wait_until(lambda: server.slots._value == 1, timeout_s=5, what="the slot freed")  # type: ignore[attr-defined]
        answer = requests.get(f"{server.url}/guests", headers={"X-Auth-Token": TOKEN}, timeout=5)
        assert answer.status_code == 200
    finally:
        server.stop()
    assert threading.active_count() < 50


def test_nova_zvm_driver_traffic(node: SimpleNamespace) -> None:
    """The calls and arguments of Nova 34's zvm driver (spawn, power, snapshot path, destroy),
    in its order, through zvmconnector: every one on the normal path succeeds."""
    call = node.call
    image_id = "5c0c3f07-3f2d-4a3e-9b7e-3d3b3e0f9a11"
    (node.images / image_id).write_bytes(b"\x02" * 4096)
    assert codes(call("image_query", imagename=image_id))[0] == 404  # -> Nova imports
    ok(call("image_import", image_id, f"file://{node.images}/{image_id}", {"os_version": "rhel8"}))
    assert ok(call("image_query", imagename=image_id))[0]["imagename"] == image_id
    host = ok(call("host_get_info"))
    assert {"vcpus", "memory_mb", "disk_total", "ipl_time"} <= set(host)
    root = ok(call("image_get_root_disk_size", image_id))
    disks = [{"size": root, "is_boot_disk": True}, {"size": "1g", "format": "ext4"}]
    ok(call("guest_create", "abc00001", 1, 256, disk_list=disks))
    net = {
        "ip_addr": "192.168.95.7",
        "gateway_addr": "192.168.95.1",
        "cidr": "192.168.95.0/24",
        "mac_addr": "fa:16:3e:00:00:07",
        "nic_id": "9d7c1a43-7b1c-4c5a-9b1e-1f0d2a3b4c5d",
    }
    ok(call("guest_create_network_interface", "abc00001", "rhel8", [net]))
    ok(call("guest_config_minidisks", "abc00001", [{"size": "1g", "format": "ext4"}]))
    ok(
        call(
            "guest_deploy",
            "abc00001",
            image_id,
            transportfiles="/tmp/cfg.tgz",
            remotehost="nova@192.168.95.2",
        )
    )
    ok(call("guest_start", "abc00001"))
    assert ok(call("guest_get_power_state", "abc00001")) == "on"
    assert ok(call("guest_get_info", "abc00001"))["num_cpu"] == 1
    ok(call("guest_softstop", "abc00001", timeout=60, poll_interval=10))
    ok(call("guest_start", "abc00001"))
    ok(call("guest_pause", "abc00001"))
    ok(call("guest_unpause", "abc00001"))
    ok(call("guest_reboot", "abc00001"))
    ok(call("guest_reset", "abc00001"))
    assert ok(call("guest_get_console_output", "abc00001"))
    assert "ABC00001" in ok(call("guest_list"))
    ok(call("guest_delete", "abc00001"))
    ok(call("image_delete", image_id))
    assert assert_bodies_valid(node.recorder.seen) >= 8


def test_capture_makes_an_image_the_other_verbs_see(node: SimpleNamespace) -> None:
    call = node.call
    url = f"file://{node.images}/base.raw"
    ok(call("image_import", "img1", url, {"os_version": "ubuntu22"}))
    ok(call("guest_create", "vm5", 1, 128))
    ok(call("guest_deploy", "vm5", "img1"))
    node.instances["VM5"] = "volume-img1"
    assert ok(call("guest_capture", "vm5", "snap1")) is None
    assert ("capture", "VM5", "snap1") in node.guests.calls
    captured = node.images / "volume-snap1.raw"
    assert ("iqn.2010-10.org.openstack:volume-snap1", captured) in node.tgt.created
    [record] = ok(call("image_query", imagename="snap1"))
    assert record["imageosdistro"] == "ubuntu22"  # the metadata of the image it ran on
    assert record["image_size_in_bytes"] == str(1 << 20)
    assert ok(call("image_get_root_disk_size", "snap1")) == str((1 << 20) // 512)
    out = ok(call("image_export", "snap1", f"file://{node.images}/snap1-copy.raw"))
    assert (node.images / "snap1-copy.raw").read_bytes() == captured.read_bytes()
    assert out["os_version"] == "ubuntu22"
    # the same name again (recorded, or an image target of this node): 409, nothing changed
    calls = len(node.guests.calls)
    for name in ("snap1", "img1"):
        assert codes(call("guest_capture", "vm5", name)) == (300, 300, 13, 40), name
    assert len(node.guests.calls) == calls
    # only rootonly; bad input is the REST layer's 400
    assert codes(call("guest_capture", "vm5", "x2", capture_type="alldisks"))[:3] == (
        501,
        501,
        1,
    )
    assert codes(call("guest_capture", "vm5", "x3", compress_level=12))[:3] == (400, 400, 400)
    assert codes(call("guest_capture", "nobody", "x4")) == (404, 404, 1, 10)
    assert not any((node.images / f"volume-{n}.raw").exists() for n in ("x2", "x3", "x4"))
    # a base image with instances on it cannot be deleted; a captured one takes its file
    assert codes(call("image_delete", "img1")) == (409, 409, 1, 40)
    # nor one that other nodes read from this node's target
    node.tgt.readers["iqn.2010-10.org.openstack:volume-snap1"] = ["10.0.0.7"]
    result = call("image_delete", "snap1")
    assert codes(result) == (409, 409, 1, 40) and "10.0.0.7" in result["errmsg"]
    assert captured.exists()
    node.tgt.readers.clear()
    ok(call("image_delete", "snap1"))
    assert not captured.exists()
    assert all(i != "iqn.2010-10.org.openstack:volume-snap1" for i, _ in node.tgt.created)
    assert (node.images / "base.raw").exists()
