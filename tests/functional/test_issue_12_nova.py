"""Issue 12, 4b: Nova's libvirt driver with VMThunder disks (``nova.virt.vmthunder``), run
with Nova's own unit-test fixtures around a real Virtman stack (qemu driver: its tgtd and
qemu-storage-daemon, a real volt-api, a real image server's tgtd).

Nova's tests run under ``python -m testtools.run`` (pytest trips on Nova's ddt and
testscenarios classes), in a child process; this test starts the daemons, hands them to it
and checks its result. Nova is part of the test requirements: without it this test fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from brick import psk
from brick.tgt import Chap, TgtDaemon
from tests.functional.clusterfixtures import TGT_BASE, write_image
from tests.functional.voltproc import VoltProcess, free_port

pytestmark = pytest.mark.functional
REPO = Path(__file__).resolve().parents[2]
TESTS = "tests.nova.nova_vmthunder_libvirt"


def test_nova_vmthunder_libvirt_driver(volt: VoltProcess, tmp_path: Path) -> None:
    assert importlib.util.find_spec("nova") is not None, "nova is missing: run tools/setup.sh"
    assert importlib.util.find_spec("nova.virt.vmthunder") is not None, "run tools/setup.sh"
    image = tmp_path / "image1.raw"
    write_image(image, 8)
    iqn = "iqn.2010-10.org.openstack:volume-novaimage"
    server = TgtDaemon(TGT_BASE + 86, [f"127.0.0.1:{free_port()}"], run_dir=tmp_path / "tgt")
    server.start()
    try:
        chap = Chap("vmt", "s3cret-pass-123")
        server.adm.create_target(iqn, image, chap=chap)
        key = tmp_path / "nbd.psk"
        psk.write_new(key, "vmt")
        conf = tmp_path / "virtman.conf"
        node = tmp_path / "node"
        captures = node / "images"  # where the node writes its captures (Nova's snapshots)
        captures.mkdir(parents=True)
        conf.write_text(
            "[DEFAULT]\ndriver = qemu\nhost_ip = 127.0.0.2\nmaster_ip = 127.0.0.1\n"
            f"master_port = {volt.port}\nmaster_token = {volt.token}\n"
            f"heartbeat_interval = 1\nstate_dir = {node / 'state'}\nrun_dir = {node / 'run'}\n"
            f"iscsi_port = {free_port()}\nnbd_port = {free_port()}\n"
            f"tgt_control_port = {TGT_BASE + 87}\nlog_file = {node / 'virtman.log'}\n"
            f"chap_user = {chap.user}\nchap_password = {chap.password}\nnbd_psk_file = {key}\n"
            f"image_dirs = {captures}\n"
        )
        connection = {"target_portal": server.portals[0], "target_iqn": iqn, "target_lun": 1}
        env = {
            **os.environ,
            "VMT_NOVA_VIRTMAN_CONF": str(conf),
            "VMT_NOVA_CONNECTION": json.dumps(connection),
            "VMT_NOVA_IMAGE_FILE": str(image),
            # Nova 34 native threading mode: Virtman's threads and sockets are not eventlet's
            "OS_NOVA_DISABLE_EVENTLET_PATCHING": "1",
        }
        run = subprocess.run(
            [sys.executable, "-m", "testtools.run", TESTS],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-12000:]
        assert "Ran 2 tests" in output and "OK" in output, output[-3000:]
        [disk] = [ln for ln in output.splitlines() if ln.startswith("NOVA-DISK ")]
        print(disk)  # the domain's root disk, as Nova's driver wrote it
        assert server.adm.connections(iqn) == []  # the node logged out: nothing left
        [captured] = [ln for ln in output.splitlines() if ln.startswith("NOVA-CAPTURED ")]
        print(captured)  # Nova's snapshot: a capture, uploaded
        assert list(captures.iterdir()) == []  # the test removed its capture; none left
        [image_id] = re.findall(r"NOVA-IMAGE (\S+)", output)  # a line of its own or not
        assert volt.request("GET", f"/v1/volumes/volume-{image_id}")[0] == 404
        assert not list((node / "state" / "instances").glob("*"))
    finally:
        server.adm.delete_target(iqn)
        server.stop()
