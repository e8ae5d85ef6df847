"""Issue 12, 4a: unmodified Nova (``compute_driver = zvm.ZVMDriver``) drives a real node's
z/VM API (guest manager wired, libvirtd + QEMU, the tiny guest): spawn boots a VM whose
console shows it (Nova's VIF a NIC on a bridge of this run), list, resources, the power
verbs, a snapshot (capture + export, uploaded to Glance: the guest's disk flattened, with a
mark written through its snapshot) and destroy. Nova's side runs under testtools in a child
process (``tests/nova/nova_zvm_driver.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from brick.executor import execute
from tests.functional import vmfixtures
from tests.functional.virtmanproc import VirtmanProcess
from tests.functional.voltproc import free_port

pytestmark = pytest.mark.functional
libvirt_daemons = vmfixtures.libvirt_daemons
guest_image = vmfixtures.guest_image
REPO = Path(__file__).resolve().parents[2]
LAB = os.environ.get("VMT_TEST_LAB", "vmt")


def test_nova_zvm_driver_on_a_node(libvirt_daemons, guest_image) -> None:
    guest = guest_image
    bridge = f"{LAB}nb{os.getpid() % 100000}"  # the guests' NICs: a bridge of this run
    execute(["ip", "link", "add", bridge, "type", "bridge"])
    try:
        execute(["ip", "link", "set", bridge, "up"])
        run_nova(libvirt_daemons.uri, guest, bridge)
    finally:
        execute(["ip", "link", "del", bridge])


def run_nova(libvirt_uri: str, guest, bridge: str) -> None:
    with tempfile.TemporaryDirectory(prefix="vmt-novazvm-") as folder:
        port = free_port()
        node = VirtmanProcess(
            Path(folder) / "node",
            token=None,
            auth_strategy="noauth",
            zvm_api_enabled=True,
            zvm_api_port=port,
            zvm_bridge=bridge,
            guest_libvirt_uri=libvirt_uri,
            guest_kernel=guest.kernel,
            guest_initrd=guest.initrd,
            guest_cmdline=f"{guest.cmdline} vmt.stay",
            guest_name_prefix=f"{LAB}{os.getpid()}-",
            heartbeat_interval=1,
        )
        node.start()
        try:
            env = {
                **os.environ,
                "OS_NOVA_DISABLE_EVENTLET_PATCHING": "1",
                "VMT_NOVA_ZVM_URL": f"http://127.0.0.1:{port}",
                "VMT_NOVA_IMAGE_DIR": str(node.image_dir),
                "VMT_NOVA_ROOTFS": str(guest.rootfs),
                "VMT_NOVA_MARKER": guest.expected_marker,
                "VMT_NOVA_BRIDGE": bridge,
            }
            run = subprocess.run(
                [sys.executable, "-m", "testtools.run", "tests.nova.nova_zvm_driver"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=500,
            )
            output = run.stdout + run.stderr
            assert run.returncode == 0, output[-8000:] + node.logs()[-4000:]
            [line] = [ln for ln in output.splitlines() if ln.startswith("NOVA-SPAWN-BOOTED-S ")]
            print(line)
            [snap] = [ln for ln in output.splitlines() if "NOVA-SNAPSHOT-BYTES " in ln]
            print(snap)  # Nova's snapshot: capture + export + upload of the marked disk
            client = node.client(timeout=120)
            assert client.call("guest_list") == []
            assert client.call("list") == []  # destroy released the guest's snapshot
        finally:
            try:  # a failed run leaves no guest running
                client = node.client(timeout=120)
                for userid in client.call("guest_list"):
                    client.call("guest_delete", userid)
            finally:
                node.stop()
