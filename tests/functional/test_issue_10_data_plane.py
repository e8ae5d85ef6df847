"""Issue 10, findings 2 and 7 (data part): an authenticated data plane.

Real daemons only: qemu-storage-daemon NBD servers with TLS-PSK on 127.0.0.1, virtmanserver
started on 127.0.0.1, and a LocalCluster (image server + one qemu node in namespaces) read
from its control namespace with nbdinfo / qemu-img / iscsi-ls, without, with wrong and with
the right credentials.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from brick import psk
from brick.exception import Conflict
from brick.executor import Result, execute
from brick.qsd.daemon import StorageDaemon
from brick.qsd.qmp import QMPError
from brick.tgt import TgtAdm
from tests.functional.clusterfixtures import (
    IMAGE,
    TGT_BASE,
    cluster_factory,
    create_vm,
    disk_matches,
    export_image,
)
from tests.functional.test_dm_nbd_relay import device
from tests.unit.fakes.settings import settings as unit_settings
from virtman.drivers.dm.nbd import NbdRelay

__all__ = ["cluster_factory", "device"]  # fixtures, used by name

REPO = Path(__file__).resolve().parents[2]
IDENTITY = "vmthunder"
SIZE = 8 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def key_file(directory: Path) -> Path:
    directory.mkdir(mode=0o700)
    path = directory / psk.FILENAME
    psk.write_new(path, IDENTITY)
    return path


def run(argv: list[str], **kw: object) -> Result:
    return execute(argv, check_exit_code=False, timeout_s=60, **kw)  # type: ignore[arg-type]


def nbds(port: int, psk_file: Path, export: str = "", host: str = "127.0.0.1") -> str:
    return f"nbds://{IDENTITY}@{host}:{port}/{export}?tls-psk-file={psk_file}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- brick: an NBD server with TLS-PSK on 127.0.0.1 ------------------------------------------
@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[StorageDaemon, int, Path, Path]]:
    """A daemon exporting a random image as ``img`` on 127.0.0.1 with TLS: (daemon, port,
    image, key file)."""
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(SIZE))
    key = key_file(tmp_path / "keys")
    daemon = StorageDaemon("vmt-i10-srv", tmp_path / "run")
    port = free_port()
    try:
        daemon.start()
        assert daemon.add_tls_psk("psk-srv", key.parent, endpoint="server") is True
        daemon.start_nbd_server("127.0.0.1", port, tls_creds="psk-srv")
        daemon.add_file("f0", image)
        daemon.export_nbd("e0", "f0", "img")
        yield daemon, port, image, key
    finally:
        daemon.stop()


def test_issue_10_nbd_without_the_key_lists_and_reads_nothing(
    tls_server: tuple[StorageDaemon, int, Path, Path], tmp_path: Path
) -> None:
    _, port, image, key = tls_server
    plain = run(["nbdinfo", "--list", f"nbd://127.0.0.1:{port}"])
    assert plain.exit_code != 0 and "img" not in plain.stdout, plain
    out = tmp_path / "plain.raw"
    copy = run(["nbdcopy", f"nbd://127.0.0.1:{port}/img", str(out)])
    assert copy.exit_code != 0 and (not out.exists() or out.stat().st_size == 0), copy
    wrong = key_file(tmp_path / "wrong")  # same identity, another key
    bad = run(["nbdinfo", "--list", nbds(port, wrong)])
    assert bad.exit_code != 0 and "img" not in bad.stdout, bad
    assert "gnutls_handshake" in bad.stderr, bad.stderr
    good = run(["nbdinfo", "--list", nbds(port, key)])
    assert good.exit_code == 0, good.stderr
    assert 'export="img"' in good.stdout
    copied = tmp_path / "copy.raw"
    assert run(["nbdcopy", nbds(port, key, "img"), str(copied)]).exit_code == 0
    assert copied.read_bytes() == image.read_bytes()


def test_issue_10_qsd_nbd_paths_present_the_key_and_credentials_are_adopted(
    tls_server: tuple[StorageDaemon, int, Path, Path], tmp_path: Path
) -> None:
    server, port, image, key = tls_server
    client = StorageDaemon("vmt-i10-cli", tmp_path / "run")
    wrong = key_file(tmp_path / "wrong")
    try:
        client.start()
        assert client.add_tls_psk("bad", wrong.parent, endpoint="client", username=IDENTITY)
        with pytest.raises(QMPError, match="TLS handshake failed"):
            client.add_nbd("n-bad", "127.0.0.1", port, "img", tls_creds="bad")
        with pytest.raises(QMPError, match="TLS negotiation required"):
            client.add_nbd("n-plain", "127.0.0.1", port, "img")
        assert client.nodes() == []
        assert client.add_tls_psk("good", key.parent, endpoint="client", username=IDENTITY)
        client.add_nbd("n0", "127.0.0.1", port, "img", tls_creds="good")
        client.start_nbd_server("127.0.0.1", free_port())  # a plain relay, to read it back
        client.export_nbd("e0", "n0", "relayed")
        relayed = tmp_path / "relayed.raw"
        address = client.nbd_server
        assert address is not None
        assert run(["nbdcopy", f"nbd://{address}/relayed", str(relayed)]).exit_code == 0
        assert sha256(relayed) == sha256(image)
    finally:
        client.stop()
    # a restarted owner adopts the server's credentials and TLS server: no second object
    server.detach()
    again = StorageDaemon("vmt-i10-srv", tmp_path / "run")
    assert again.adopt()
    assert again.add_tls_psk("psk-srv", key.parent, endpoint="server") is False
    again.start_nbd_server("127.0.0.1", port, tls_creds="psk-srv")  # no-op
    with pytest.raises(Conflict, match="psk-srv"):
        again.start_nbd_server("127.0.0.1", port)  # the same address without TLS: refused
    with pytest.raises(Conflict, match="TLS credentials"):
        again.add_tls_psk("psk-srv", wrong.parent, endpoint="server")
    assert again.stop_nbd_server_unless_tls("psk-srv") is False
    assert again.nbd_server == f"127.0.0.1:{port}"
    assert again.stop_nbd_server_unless_tls(None) is True  # wanted plain: stopped
    assert again.nbd_server is None and again.exports() == []
    again.detach()
    assert server.adopt()


# -- the dm driver's NBD relay (a loop device standing in for cached_<image>) ---------------
def test_issue_10_the_dm_nbd_relay_serves_only_holders_of_the_key(
    tmp_path: Path, device: tuple[str, bytes]
) -> None:
    key = key_file(tmp_path / "keys")
    base = unit_settings(tmp_path / "state", host_ip="127.0.0.1")
    settings = replace(
        base, run_dir=tmp_path / "run", nbd_port=free_port(), dm_nbd_relay=True, nbd_psk_file=key
    )
    path, data = device
    relay = NbdRelay(settings)
    try:
        relay.start()
        address = relay.export("volume-dm1", path)
        port = settings.nbd_port
        assert address == f"127.0.0.1:{port}"
        plain = run(["nbdinfo", "--list", f"nbd://127.0.0.1:{port}"])
        assert plain.exit_code != 0 and "volume-dm1" not in plain.stdout, plain
        wrong = run(["nbdinfo", "--list", nbds(port, key_file(tmp_path / "wrong"))])
        assert wrong.exit_code != 0 and "volume-dm1" not in wrong.stdout, wrong
        out = tmp_path / "dm.raw"
        assert run(["nbdcopy", nbds(port, key, "volume-dm1"), str(out)]).exit_code == 0
        assert out.read_bytes() == data
        # a restarted virtman adopts the daemon, its credentials and its TLS server
        pid = relay.qsd.pid
        relay.qsd.detach()
        relay = NbdRelay(settings)
        relay.start()
        assert relay.qsd.pid == pid and relay.exported("volume-dm1")
        again = tmp_path / "again.raw"
        assert run(["nbdcopy", nbds(port, key, "volume-dm1"), str(again)]).exit_code == 0
        assert again.read_bytes() == data
        relay.unexport("volume-dm1")
        relay.stop()  # exports nothing: the daemon goes, and the copy of the key with it
        assert sorted(p.name for p in settings.run_dir.iterdir()) == []
    finally:
        relay.qsd.stop()


# -- a node's relay and the image server, in a LocalCluster -----------------------------------
def test_issue_10_a_node_serves_iscsi_only_with_chap_and_nbd_only_with_the_key(
    cluster_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(1)
    image_file = export_image(cluster, 8)
    create_vm(cluster, "n1", "vm1")
    ctl = cluster.hosts["ctl"]
    n1 = cluster.hosts["n1"].address
    user, password = cluster.chap

    def ctl_run(argv: list[str], env: dict[str, str] | None = None) -> Result:
        full_env = {**os.environ, **(env or {})}
        return ctl.run(argv, check_exit_code=False, timeout_s=60, env=full_env)

    # iSCSI: the image server's target and n1's relay target (tgtd, ACL ALL + CHAP)
    relay_iqn = TgtAdm(TGT_BASE + 1).targets()[0].iqn
    img_url = f"iscsi://{cluster.hosts['img'].address}:3260/iqn.2010-10.org.openstack:{IMAGE}/1"
    relay_url = f"iscsi://{n1}:3260/{relay_iqn}/1"
    right = {"LIBISCSI_CHAP_USERNAME": user, "LIBISCSI_CHAP_PASSWORD": password}
    wrong = {"LIBISCSI_CHAP_USERNAME": user, "LIBISCSI_CHAP_PASSWORD": "wrong-password-1"}
    for url in (img_url, relay_url):
        for env in (None, wrong):
            info = ctl_run(["qemu-img", "info", url], env)
            assert info.exit_code != 0, (url, env and "wrong", info.stdout)
            assert "Failed to log in to target. Status: Authentication failure" in info.stderr
            portal = url.rpartition("/")[0].rpartition("/")[0] + "/"
            listed = ctl_run(["iscsi-ls", "-s", portal], env)
            assert "Lun:" not in listed.stdout, listed.stdout  # discovery, but no login
            assert "Status: Authentication failure" in listed.stdout, listed.stdout
        out = tmp_path / f"read-{len(url)}.raw"
        read = ctl_run(["qemu-img", "convert", "-O", "raw", url, str(out)], right)
        assert read.exit_code == 0, read.stderr
        assert out.read_bytes() == image_file.read_bytes()
        listed = ctl_run(["iscsi-ls", "-s", url.rpartition("/")[0].rpartition("/")[0] + "/"], right)
        assert "Lun:1" in listed.stdout, listed

    # NBD: n1's relay, read from the control namespace
    assert cluster.psk_file is not None
    plain = ctl_run(["nbdinfo", "--list", f"nbd://{n1}:10809"])
    assert plain.exit_code != 0 and IMAGE not in plain.stdout, plain
    other = key_file(tmp_path / "wrong")
    bad = ctl_run(["nbdinfo", "--list", nbds(10809, other, host=n1)])
    assert bad.exit_code != 0 and IMAGE not in bad.stdout, bad
    good = ctl_run(["nbdinfo", "--list", nbds(10809, cluster.psk_file, host=n1)])
    assert good.exit_code == 0 and f'export="{IMAGE}"' in good.stdout, good
    out = tmp_path / "nbd.raw"
    obj = f"tls-creds-psk,id=t0,endpoint=client,dir={cluster.psk_file.parent},username={IDENTITY}"
    opts = f"driver=nbd,server.type=inet,server.host={n1},server.port=10809,export={IMAGE}"
    source = ["--object", obj, "--image-opts", f"{opts},tls-creds=t0"]
    copy = ctl_run(["qemu-img", "convert", *source, "-O", "raw", str(out)])
    assert copy.exit_code == 0, copy.stderr
    assert out.read_bytes() == image_file.read_bytes()


def test_issue_10_a_node_restarted_with_a_key_serves_its_relay_over_tls_only(
    cluster_factory, tmp_path: Path
) -> None:
    """Upgrade: a node ran with plain NBD (insecure_targets); virtmanserver is killed, the
    cluster's key is configured, and the restarted node (adopting its daemons and its VM)
    serves the relay over TLS only; the VM's disk still reads the image."""
    cluster = cluster_factory(1, nbd_tls=False)
    image_file = export_image(cluster, 8)
    disk = create_vm(cluster, "n1", "vm1")
    ctl = cluster.hosts["ctl"]
    n1 = cluster.hosts["n1"].address
    listed = ctl.run(["nbdinfo", "--list", f"nbd://{n1}:10809"], check_exit_code=False)
    assert f'export="{IMAGE}"' in listed.stdout, listed  # plain NBD: anyone lists it

    cluster.daemons["n1"].kill9()  # qemu-storage-daemon and tgtd stay
    key = cluster.workdir / "nbd-psk" / psk.FILENAME
    key.parent.mkdir(mode=0o700)
    psk.write_new(key, cluster.psk_identity)
    cluster.psk_file = key
    cluster.start_virtman("n1")
    cluster.wait_for(lambda: cluster.rpc("n1", "list") == [f"vm1:{IMAGE}"], "vm1 adopted")
    plain = ctl.run(["nbdinfo", "--list", f"nbd://{n1}:10809"], check_exit_code=False)
    assert plain.exit_code != 0 and IMAGE not in plain.stdout, plain
    cluster.wait_for(
        lambda: (
            f'export="{IMAGE}"'
            in ctl.run(
                ["nbdinfo", "--list", nbds(10809, key, host=n1)], check_exit_code=False
            ).stdout
        ),
        "the relay's export back, over TLS",
    )
    assert disk_matches(disk, image_file)
    log = (cluster.node_dir("n1") / "virtman.log").read_text()
    assert "runs with no TLS, not vmt-nbd-psk-server: restarting it" in log


def test_issue_10_a_rotated_key_is_served_next_to_the_old_one(
    cluster_factory, tmp_path: Path
) -> None:
    """Rotation, step by step (docs/security.rst): the new key added as a second line, then
    moved first; each time the restarted node adopts its daemons and accepts both keys."""
    cluster = cluster_factory(1)
    image_file = export_image(cluster, 8)
    disk = create_vm(cluster, "n1", "vm1")
    ctl = cluster.hosts["ctl"]
    n1 = cluster.hosts["n1"].address
    old = cluster.psk_file.read_text()
    new = psk.make_line("vmthunder-2")
    new_only = tmp_path / "new" / psk.FILENAME
    new_only.parent.mkdir(mode=0o700)
    new_only.write_text(new)
    new_only.chmod(0o600)

    def lists(key: Path, identity: str) -> bool:
        url = nbds(10809, key, host=n1).replace(f"{IDENTITY}@", f"{identity}@")
        listed = ctl.run(["nbdinfo", "--list", url], check_exit_code=False)
        return f'export="{IMAGE}"' in listed.stdout

    assert not lists(new_only, "vmthunder-2")
    for text in (old + new, new + old):
        cluster.psk_file.write_text(text)
        cluster.daemons["n1"].stop()  # with a VM: the stack and its daemons stay up
        cluster.start_virtman("n1")
        cluster.wait_for(lambda: cluster.rpc("n1", "list") == [f"vm1:{IMAGE}"], "vm1 adopted")
        assert lists(cluster.psk_file, IDENTITY) and lists(new_only, "vmthunder-2"), text
    assert disk_matches(disk, image_file)


# -- virtmanserver: no CHAP and no key means no start, unless insecure_targets ---------------
def node_config(tmp_path: Path, extra: str) -> Path:
    conf = tmp_path / "virtman.conf"
    conf.write_text(
        "[DEFAULT]\n"
        f"host_ip = 127.0.0.1\nmaster_ip = 127.0.0.1\nmaster_port = {free_port()}\n"
        f"listen_host = 127.0.0.1\nlisten_port = {free_port()}\napi_token = t-{os.getpid()}\n"
        f"iscsi_port = {free_port()}\nnbd_port = {free_port()}\n"
        f"tgt_control_port = {TGT_BASE + 90}\n"
        f"state_dir = {tmp_path / 'state'}\nrun_dir = {tmp_path / 'run'}\n" + extra
    )
    return conf


def server(conf: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "virtman.cmd.server", "--config-file", str(conf)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    ("extra", "missing"),
    [
        ("", "chap_user/chap_password and nbd_psk_file"),
        ("chap_user = vmt\nchap_password = s3cret-pass-123\n", "nbd_psk_file"),
        ("nbd_psk_file = {key}\n", "chap_user/chap_password"),
        ("insecure_targets = false\n", "chap_user/chap_password and nbd_psk_file"),
    ],
)
def test_issue_10_a_node_without_credentials_refuses_to_start(
    tmp_path: Path, extra: str, missing: str
) -> None:
    key = key_file(tmp_path / "keys")
    proc = server(node_config(tmp_path, extra.format(key=key)))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert (
        f"virtmanserver: refusing to serve unauthenticated targets: set {missing} "
        "(vmt-initenv.py generates them), or insecure_targets = true to serve them without"
    ) in out
    assert not (tmp_path / "run").exists()  # nothing was started


def test_issue_10_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key = key_file(tmp_path / "keys")
    key.chmod(0o644)
    extra = f"chap_user = vmt\nchap_password = s3cret-pass-123\nnbd_psk_file = {key}\n"
    proc = server(node_config(tmp_path, extra))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"virtmanserver: invalid nbd_psk_file '{key}': is mode 0644: must be 0600" in out


def test_issue_10_insecure_targets_starts_with_a_warning(tmp_path: Path) -> None:
    proc = server(node_config(tmp_path, "insecure_targets = true\n"))
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Virtman Server Run ..." in line:
                break
        text = "".join(lines)
        assert "Virtman Server Run ..." in text, text
        warning = [line for line in lines if "insecure_targets = true" in line]
        assert len(warning) == 1 and " WARNING " in warning[0], text
        assert (
            "serving iSCSI targets without CHAP and NBD exports without TLS; anyone who "
            "reaches this node reads its images"
        ) in warning[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert not list((tmp_path / "run").glob("*.pid"))  # its qsd and tgtd stopped with it
