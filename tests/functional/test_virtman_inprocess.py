"""``Virtman(openstack_compatible=True)`` in-process, as Nova makes it: the configuration
comes from files, the driver is the configured one, create/list/destroy give the original's
results, and the relay is registered with a real volt-api. All on 127.0.0.0/8: the image
server on 127.0.0.1, the node on 127.0.0.2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from brick import psk
from brick.tgt import Chap, TgtDaemon
from tests.functional.clusterfixtures import disk_matches, write_image
from tests.functional.voltproc import VoltProcess, free_port

pytestmark = pytest.mark.functional

NOVA_SIDE = """
import json, sys
from virtman.compute import Virtman
conn = json.loads(sys.argv[2])
virtman = Virtman(openstack_compatible=True, config_files=[sys.argv[1]])
out = {"create": virtman.create("vm1", "image1", conn, None)}
out["again"] = virtman.create("vm1", "image1", [conn])
out["list"] = virtman.list()
print(json.dumps(out), flush=True)
sys.stdin.readline()  # the test reads the disk meanwhile
out = {"destroy": virtman.destroy("vm1"), "destroy_again": virtman.destroy("vm1")}
out["list"] = virtman.list()
virtman.shutdown()
print(json.dumps(out), flush=True)
"""


def test_virtman_openstack_compatible_in_process(volt: VoltProcess, tmp_path: Path) -> None:
    image = tmp_path / "image1.raw"
    write_image(image, 8)
    iqn = "iqn.2010-10.org.openstack:volume-image1"
    server = TgtDaemon(3460, [f"127.0.0.1:{free_port()}"], run_dir=tmp_path / "tgt")
    server.start()
    try:
        chap = Chap("vmt", "s3cret-pass-123")  # the node logs in with the cluster's account
        server.adm.create_target(iqn, image, chap=chap)
        key = tmp_path / "nbd.psk"
        psk.write_new(key, "vmt")
        conf = tmp_path / "virtman.conf"
        node = tmp_path / "node"
        conf.write_text(
            "[DEFAULT]\nhost_ip = 127.0.0.2\nmaster_ip = 127.0.0.1\n"
            f"master_port = {volt.port}\nmaster_token = {volt.token}\n"
            f"heartbeat_interval = 1\nstate_dir = {node / 'state'}\nrun_dir = {node / 'run'}\n"
            f"iscsi_port = {free_port()}\nnbd_port = {free_port()}\ntgt_control_port = 3461\n"
            f"log_file = {node / 'virtman.log'}\n"
            f"chap_user = {chap.user}\nchap_password = {chap.password}\nnbd_psk_file = {key}\n"
        )
        connection = {"target_portal": server.portals[0], "target_iqn": iqn, "target_lun": 1}
        nova = subprocess.Popen(
            [sys.executable, "-c", NOVA_SIDE, str(conf), json.dumps(connection)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            first = json.loads(nova.stdout.readline())  # type: ignore[union-attr]
            disk = node / "state" / "instances" / "vm1.qcow2"
            assert first["create"] == f"0:{disk}", first
            assert first["again"].startswith("1:"), first
            assert first["list"] == ["vm1:volume-image1"]
            assert disk_matches(str(disk), image)
            status, nodes = volt.request("GET", "/v1/volumes/volume-image1")
            assert status == 200
            assert [(n["peer_id"], n["status"]) for n in nodes] == [
                ("127.0.0.2:volume-image1", "OK")
            ]
            nova.stdin.write("\n")  # type: ignore[union-attr]
            nova.stdin.flush()  # type: ignore[union-attr]
            second = json.loads(nova.stdout.readline())  # type: ignore[union-attr]
            assert nova.wait(timeout=60) == 0
        finally:
            if nova.poll() is None:
                nova.kill()
                nova.wait()
        assert second["destroy"] == "0:" and second["destroy_again"].startswith("1:")
        assert second["list"] == []
        assert not disk.exists()
        assert volt.request("GET", "/v1/volumes/volume-image1")[0] == 404
        assert server.adm.connections(iqn) == []
    finally:
        server.adm.delete_target(iqn)
        server.stop()
