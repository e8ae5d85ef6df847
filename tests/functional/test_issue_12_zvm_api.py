"""Issue 12, Build 2 and Acceptance item 1: the z/VM Cloud Connector-shaped API of a real
virtmanserver, its guest verbs backed by the node's guest manager (libvirtd + QEMU TCG).

A virtmanserver (qemu driver, its own tgtd, the shared test libvirtd) runs with
``zvm_api_enabled``; the connector's own client ``zvmconnector`` (zVMCloudConnector 1.6.3 from
PyPI) drives the token handshake, host and image verbs, bad input, and every implemented guest
verb on a real guest (the tiny guest: its console shows the boot marker). Every body it sends
is checked against the connector's jsonschema; every reply has the connector's envelope.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from zvmconnector import connector, restclient
from zvmsdk.sdkwsgi.schemas import guest as guest_schemas
from zvmsdk.sdkwsgi.schemas import image as image_schemas
from zvmsdk.sdkwsgi.validation import _SchemaValidator

from brick.executor import execute
from brick.wait import wait_until
from tests.functional import vmfixtures
from tests.functional.virtmanproc import VirtmanProcess
from tests.functional.vmfixtures import domain_gone
from tests.functional.voltproc import free_port
from virtman.guest.domains import VirtualMachines

pytestmark = pytest.mark.functional
libvirt_daemons = vmfixtures.libvirt_daemons
guest_image = vmfixtures.guest_image
LAB = os.environ.get("VMT_TEST_LAB", "vmt")
PREFIX = f"{LAB}{os.getpid()}z-"  # instance names of this run: no other run's domains
BOOT_S = 120.0  # vmfixtures.BOOT_TIMEOUT_S: ~5-15 s alone, far more on a loaded host

TOKEN = "test-api-token"
ENVELOPE = {"overallRC", "rc", "rs", "modID", "output", "errmsg"}
IQN = "iqn.2010-10.org.openstack:volume-"


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, Any]]:
    """(method, url, JSON body) of every request zvmconnector sends."""
    seen: list[tuple[str, str, Any]] = []
    real = restclient.requests.request

    def record(method: str, url: str, **kwargs: Any) -> Any:
        data = kwargs.get("data")
        seen.append((method, url, json.loads(data) if isinstance(data, str) else data))
        return real(method, url, **kwargs)

    monkeypatch.setattr(restclient.requests, "request", record)
    return seen


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmt-zvm-") as folder:
        yield Path(folder)


@pytest.fixture
def bridge() -> Iterator[str]:
    """A Linux bridge of this run (no address, no uplink) for the guests' NICs."""
    name = f"{LAB}zb{os.getpid() % 100000}"
    execute(["ip", "link", "add", name, "type", "bridge"])
    try:
        execute(["ip", "link", "set", name, "up"])
        yield name
    finally:
        execute(["ip", "link", "del", name])


@pytest.fixture
def node(libvirt_daemons, guest_image, workdir: Path, bridge: str) -> Iterator[VirtmanProcess]:
    """A node whose z/VM API has the real guest manager behind it."""
    port = free_port()
    proc = VirtmanProcess(
        workdir / "node",
        zvm_api_enabled=True,
        zvm_api_port=port,
        zvm_bridge=bridge,
        guest_libvirt_uri=libvirt_daemons.uri,
        guest_kernel=guest_image.kernel,
        guest_initrd=guest_image.initrd,
        guest_cmdline=f"{guest_image.cmdline} vmt.stay",
        guest_name_prefix=PREFIX,
    )
    proc.zvm_port = port  # type: ignore[attr-defined]
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def ok(result: dict[str, Any]) -> Any:
    assert set(result) == ENVELOPE, result
    assert (result["overallRC"], result["rc"], result["rs"], result["errmsg"]) == (0, 0, 0, ""), (
        result
    )
    return result["output"]


def codes(result: dict[str, Any]) -> tuple[int, int, int, Any]:
    assert set(result) >= ENVELOPE and result["errmsg"], result
    return result["overallRC"], result["rc"], result["rs"], result["modID"]


def client_of(node: VirtmanProcess, tmp_path: Path, **kwargs: Any) -> restclient.RESTClient:
    token_file = tmp_path / "zvm-token"
    token_file.write_text(TOKEN)
    port = node.zvm_port  # type: ignore[attr-defined]
    return restclient.RESTClient(
        "127.0.0.1", port, token_path=str(token_file), auth="token", **kwargs
    )


def test_issue_12_zvm_api_host_images_token_and_bad_input(
    node: VirtmanProcess, tmp_path: Path, sent: list[tuple[str, str, Any]]
) -> None:
    port = node.zvm_port  # type: ignore[attr-defined]
    assert f"z/VM Cloud Connector API on http://127.0.0.1:{port}" in node.logs()
    # token: the plain connector sends none and is refused; the handshake lets it in
    plain = connector.ZVMConnector("127.0.0.1", port)
    assert codes(plain.send_request("image_query")) == (400, 400, 401, 120)
    call = client_of(node, tmp_path).call
    host = ok(call("host_get_info"))
    assert set(host) == {
        "hypervisor_hostname", "hypervisor_type", "hypervisor_version", "vcpus", "vcpus_used",
        "memory_mb", "memory_mb_used", "disk_total", "disk_used", "disk_available", "cpu_info",
        "ipl_time",
    }  # fmt: skip
    assert host["memory_mb"] > 0 and host["disk_total"] > 0
    pool = ok(call("host_diskpool_get_info"))
    assert pool["disk_total"] >= pool["disk_available"] > 0
    # images: import registers the file with the node's image service (a real tgtd target)
    image = node.image_dir / "base.raw"
    image.write_bytes(os.urandom(1 << 20))
    before = node.state()
    for url in ("file:///etc/shadow", f"file://{node.image_dir}/../../../etc/passwd",
                "http://127.0.0.1:1/x.raw", f"file://{node.image_dir}/missing.raw"):  # fmt: skip
        result = call("image_import", "leak", url, {"os_version": "rhel8"})
        assert codes(result)[:3] == (400, 400, 400), (url, result)
    result = call("image_import", "bad name!", f"file://{image}", {"os_version": "rhel8"})
    assert codes(result)[:3] == (400, 400, 400) and "image_name" in result["errmsg"]
    assert node.state() == before  # nothing exported, no file written
    ok(call("image_import", "img1", f"file://{image}", {"os_version": "ubuntu22"}))
    assert (IQN + "img1", [str(image)]) in node.tgt_targets()
    assert "volume-img1" in node.client().list_image_target()
    [record] = ok(call("image_query", imagename="img1"))
    assert (record["imagename"], record["disk_size_units"]) == ("img1", "2048:BLK")
    assert ok(call("image_get_root_disk_size", "img1")) == "2048"
    assert codes(call("image_import", "img1", f"file://{image}", {"os_version": "rhel8"})) == (
        300, 300, 13, 40,
    )  # fmt: skip
    out = ok(call("image_export", "img1", f"file://{node.image_dir}/copy.raw"))
    assert Path(out["image_path"]).read_bytes() == image.read_bytes()
    assert codes(call("image_export", "img1", "file:///tmp/escape.raw"))[:3] == (400, 400, 400)
    assert not Path("/tmp/escape.raw").exists()
    # guests: the node's guest manager answers (none yet); no vswitch on a KVM node
    assert ok(call("guest_list")) == []
    assert host["hypervisor_type"] in ("qemu", "kvm") and host["vcpus_used"] >= 0
    assert codes(call("vswitch_get_list")) == (501, 501, 1, 20)
    ok(call("image_delete", "img1"))
    assert not any(iqn == IQN + "img1" for iqn, _ in node.tgt_targets())
    assert ok(call("image_query")) == [] and image.exists()
    assert codes(call("image_get_root_disk_size", "img1")) == (404, 404, 1, 40)
    # the bodies zvmconnector sent are valid for the connector's own schemas
    checked = 0
    for method, url, body in sent:
        path = url.split(str(port), 1)[1].split("?")[0]
        schema = {("POST", "/images"): image_schemas.create}.get((method, path))
        if method == "PUT" and path.startswith("/images/"):
            schema = image_schemas.export
        if schema is not None:
            _SchemaValidator(schema).validate(body)
            checked += 1
    assert checked >= 9


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    execute(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"]
    )  # fmt: skip
    return cert, key


def test_issue_12_zvm_api_tls(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    port = free_port()
    node = VirtmanProcess(
        tmp_path / "node", zvm_api_enabled=True, zvm_api_port=port, tls_cert_file=cert,
        tls_key_file=key,
    )  # fmt: skip
    node.zvm_port = port  # type: ignore[attr-defined]
    node.start()
    try:
        assert f"z/VM Cloud Connector API on https://127.0.0.1:{port}" in node.logs()
        secure = client_of(node, tmp_path, ssl_enabled=True, verify=str(cert))
        assert ok(secure.call("image_query")) == []
        untrusted = client_of(node, tmp_path, ssl_enabled=True, verify=True)
        assert codes(untrusted.call("image_query"))[:2] == (101, 101)
        with pytest.raises(requests.ConnectionError):
            requests.post(f"http://127.0.0.1:{port}/token", timeout=5)
        assert "TLS handshake" in node.logs()
    finally:
        node.stop()


def test_issue_12_imported_images_survive_a_kill_9(node: VirtmanProcess, tmp_path: Path) -> None:
    image = node.image_dir / "keep.raw"
    image.write_bytes(os.urandom(1 << 20))
    call = client_of(node, tmp_path).call
    ok(call("image_import", "keep", f"file://{image}", {"os_version": "rhel8"}))
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait()
    node.start()
    call = client_of(node, tmp_path).call
    [record] = ok(call("image_query", imagename="keep"))
    assert record["image_size_in_bytes"] == str(1 << 20)
    assert (IQN + "keep", [str(image)]) in node.tgt_targets()
    ok(call("image_delete", "keep"))
    assert ok(call("image_query")) == []
    assert not any(iqn == IQN + "keep" for iqn, _ in node.tgt_targets())


def guest_schema(method: str, path: str, body: Any) -> dict[str, Any] | None:
    """The connector's schema of a guest or image request body (None: it has none)."""
    if method == "POST" and path == "/guests":
        return guest_schemas.create
    if path.endswith("/action"):
        return {
            "deploy": guest_schemas.deploy,
            "start": guest_schemas.start,
            "stop": guest_schemas.stop,
            "softstop": guest_schemas.softstop,
        }.get(body["action"])
    if path.endswith("/interface") and method == "POST":
        return guest_schemas.create_network_interface
    if path == "/images" and method == "POST":
        return image_schemas.create
    return None


def test_issue_12_zvmconnector_drives_a_real_guest(
    node: VirtmanProcess,
    libvirt_daemons,
    guest_image,
    tmp_path: Path,
    sent: list[tuple[str, str, Any]],
    bridge: str,
) -> None:
    """Acceptance item 1: every implemented verb, through zvmconnector, on a real guest
    (its NIC a virtio interface on the run's Linux bridge)."""
    started = time.monotonic()
    port = node.zvm_port  # type: ignore[attr-defined]
    client = client_of(node, tmp_path)
    replies: list[dict[str, Any]] = []

    def call(verb: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result = client.call(verb, *args, **kwargs)
        replies.append(result)
        return result

    def console() -> str:
        return ok(call("guest_get_console_output", "za1"))

    def markers() -> int:
        return console().count(guest_image.expected_marker)

    def wait_markers(count: int) -> None:
        try:
            wait_until(
                lambda: markers() >= count,
                timeout_s=BOOT_S,
                what=f"ZA1's boot marker #{count}",
                max_interval_s=0.2,
            )
        except Exception:
            print(f"ZA1 ({ok(call('guest_get_power_state', 'za1'))}), console tail:")
            print(console()[-1500:])
            raise

    instance = f"{PREFIX}ZA1"
    domain = f"vmt-{instance}"
    image = node.image_dir / "tiny.raw"
    shutil.copy(guest_image.rootfs, image)
    try:
        ok(call("image_import", "tiny", f"file://{image}", {"os_version": "rhel8"}))
        [record] = ok(call("image_query", imagename="tiny"))
        assert record["imagename"] == "tiny"
        assert int(record["image_size_in_bytes"]) == image.stat().st_size
        root = ok(call("image_get_root_disk_size", "tiny"))
        disks = [{"size": root, "is_boot_disk": True}]
        out = ok(call("guest_create", "za1", 1, 128, disk_list=disks))
        assert (out["userid"], out["vcpus"], out["memory"]) == ("ZA1", 1, 128)
        assert ok(call("guest_list")) == ["ZA1"]
        assert ok(call("guest_get_power_state", "za1")) == "off"
        ok(call("guest_deploy", "za1", "tiny"))
        assert sorted(node.client().list()) == [f"{instance}:volume-tiny"]
        assert ok(call("guest_get_power_state", "za1")) == "off"
        net = {
            "ip_addr": "192.168.95.7",
            "cidr": "192.168.95.0/24",
            "mac_addr": "02:00:00:00:00:07",
        }
        nics = ok(call("guest_create_network_interface", "za1", "rhel8", [net]))
        assert nics["1000"]["bridge"] == bridge
        ok(call("guest_start", "za1"))
        wait_markers(1)
        boot_s = time.monotonic() - started
        assert ok(call("guest_get_power_state", "za1")) == "on"
        info = ok(call("guest_get_info", "za1"))
        assert (info["power_state"], info["num_cpu"], info["max_mem_kb"]) == ("on", 1, 131072)
        xml = "\n".join(ok(call("guest_get_definition_info", "za1"))["user_direct"])
        assert f"<name>{domain}</name>" in xml
        assert f"{node.state_dir}/instances/{instance}.qcow2" in xml  # the VMThunder snapshot
        stats = ok(call("guest_inspect_stats", "za1"))["ZA1"]
        assert int(stats["cpu"]["cpu_time"]) > 0
        assert [n["mac"] for n in stats["nics"]] == ["02:00:00:00:00:07"]
        [vnic] = ok(call("guest_inspect_vnics", ["za1"]))["ZA1"]
        assert f'<source bridge="{bridge}"' in xml or f"<source bridge='{bridge}'" in xml
        ports = execute(["ip", "-o", "link", "show", "master", bridge]).stdout
        assert f"{vnic['vdev']}:" in ports or f"{vnic['vdev']}@" in ports, ports  # its tap
        host = ok(call("host_get_info"))
        assert host["vcpus_used"] >= 1 and host["hypervisor_type"] in ("qemu", "kvm")

        ok(call("guest_pause", "za1"))
        assert ok(call("guest_get_power_state", "za1")) == "paused"
        ok(call("guest_unpause", "za1"))
        assert ok(call("guest_get_power_state", "za1")) == "on"
        ok(call("guest_reset", "za1"))  # hard reset: the kernel prints its marker again
        wait_markers(2)
        ok(call("guest_reboot", "za1"))  # ACPI: busybox ignores it, still on
        assert ok(call("guest_get_power_state", "za1")) == "on"
        t0 = time.monotonic()
        ok(call("guest_softstop", "za1", timeout=1, poll_interval=1))  # no ACPI handler
        assert time.monotonic() - t0 < 20
        assert ok(call("guest_get_power_state", "za1")) == "off"
        ok(call("guest_start", "za1"))
        assert ok(call("guest_get_power_state", "za1")) == "on"
        ok(call("guest_stop", "za1"))  # while it boots: one boot less to wait for
        assert ok(call("guest_get_power_state", "za1")) == "off"
        ok(call("guest_start", "za1"))
        wait_markers(1)  # the console starts afresh at every start
        assert ok(call("guest_get_power_state", "za1")) == "on"
        # an image in use is not deleted; the running guest is deleted whole
        assert codes(call("image_delete", "tiny"))[:2] == (409, 409)
        ok(call("guest_delete", "za1"))
        assert codes(call("guest_get_power_state", "za1")) == (404, 404, 1, 10)
        assert ok(call("guest_list")) == [] and node.client().list() == []
        assert domain_gone(libvirt_daemons.uri, domain)
        ok(call("image_delete", "tiny"))
        assert ok(call("image_query")) == []
        assert not any(iqn == IQN + "tiny" for iqn, _ in node.tgt_targets())
    finally:
        with contextlib.suppress(Exception):
            for userid in ok(client.call("guest_list")):
                client.call("guest_delete", userid)
        vms = VirtualMachines(libvirt_daemons.uri)  # whatever the node could not delete
        try:
            vms.destroy(instance)
        except Exception as exc:
            print(f"cleanup {instance}: {exc}")
        finally:
            vms.close()
    assert all(set(reply) == ENVELOPE for reply in replies)
    checked = 0
    for method, url, body in sent:
        path = url.split(str(port), 1)[1].split("?")[0]
        schema = guest_schema(method, path, body)
        if schema is not None:
            if path.endswith("/action"):
                body = {k: v for k, v in body.items() if k != "action"}
            _SchemaValidator(schema).validate(body)
            checked += 1
    assert checked == 9  # import, create, interface, deploy, 3 starts, softstop, stop
    assert list((node.state_dir / "instances").glob("*.qcow2")) == []
    print(
        f"\nzvmconnector: import+create+deploy+boot {boot_s:.1f} s; "
        f"{len(replies)} calls; whole test {time.monotonic() - started:.1f} s"
    )


def test_issue_12_zvm_api_peer_uid_for_nova(tmp_path: Path) -> None:
    """Nova's driver sends no token: ``zvm_api_auth = peer-uid`` lets in a loopback caller
    running as a listed user (here root, this test's own user) and nobody else without a
    token; it refuses to start on a non-loopback address."""
    port = free_port()
    node = VirtmanProcess(
        tmp_path / "node", zvm_api_enabled=True, zvm_api_port=port, zvm_api_auth="peer-uid",
        zvm_api_peer_users="root",
    )  # fmt: skip
    node.start()
    try:
        assert f"on http://127.0.0.1:{port} (auth token, or peer-uid of root)" in node.logs()
        nova = connector.ZVMConnector("127.0.0.1", port)  # as nova/virt/zvm/utils.py builds it
        assert ok(nova.send_request("guest_list")) == []
        assert ok(nova.send_request("image_query")) == []
    finally:
        node.stop()
    exposed = VirtmanProcess(
        tmp_path / "exposed", zvm_api_enabled=True, zvm_api_port=free_port(),
        zvm_api_listen_host="0.0.0.0", zvm_api_auth="peer-uid", zvm_api_peer_users="root",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="exited 1"):
        exposed.start()
    assert "zvm_api_auth = peer-uid needs zvm_api_listen_host on loopback" in exposed.logs()
