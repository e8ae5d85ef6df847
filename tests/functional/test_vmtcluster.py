"""The main job, ``vmt-demo/vmtcluster.py``, run as a user runs it: one ``POST /v1/clusters``
starts three real VMs, the controller spreads them over three nodes, they boot through the
whole stack; n1's z/VM API captures its guest and n2 boots the captured image through the
tree; nothing is left afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from brick.netns import list_netns
from tests.functional.vmfixtures import GUEST_CACHE, libvirt_daemons
from virtman.guest.domains import VirtualMachines

pytestmark = pytest.mark.functional
__all__ = ["libvirt_daemons"]  # the fixture used here

SCRIPT = Path(__file__).parents[2] / "vmt-demo" / "vmtcluster.py"
# The demo's own defaults unless the run names its lab (two checkouts testing at once).
LAB = os.environ.get("VMT_TEST_LAB", "vmtc")
TGT_BASE = os.environ.get("VMT_TEST_TGT_BASE", "3500")
LAST_LINE = re.compile(
    r"vmtcluster: 3 VMs booted on 3 nodes in [0-9.]+ s; image server sent ([0-9]+) bytes, "
    r"peers sent ([0-9]+) bytes; verified"
)


@pytest.mark.timeout(600)
def test_vmtcluster_three_nodes_one_vm_each(tmp_path: Path, libvirt_daemons) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--nodes", "3", "--vms-per-node", "1",
         "--workdir", str(tmp_path / "run"), "--cache-dir", str(GUEST_CACHE),
         "--lab", LAB, "--tgt-control-base", TGT_BASE],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    lines = [line for line in run.stdout.splitlines() if line.startswith("vmtcluster: ")]
    last = next(line for line in reversed(lines) if "VMs booted" in line)
    match = LAST_LINE.fullmatch(last)
    assert match, last
    image_sent, peers_sent = (int(g) for g in match.groups())
    assert image_sent > 0 and peers_sent > 0, last  # the third node read from its peers
    assert run.stdout.count("vmtburst: POST /v1/clusters: 3 VMs") == 1, output  # one call
    burst, _, teardown = run.stdout.partition(" DONE\n")  # the burst's task, then its destroy
    progress = re.findall(r"^vmtburst: (3 VMs: .*) \(", burst, re.M)
    assert progress[-1] == "3 VMs: 0 placed, 0 deploying, 3 running, 0 failed", output
    assert len(progress) >= 2, output  # seen on the way, not only at the end
    assert re.search(r"^vmtburst: task \S+ DELETED$", teardown, re.M), output
    booted_on = re.findall(r"^vmtcluster: vm-([0-2]) booted on (n[1-3]) ", run.stdout, re.M)
    assert sorted(vm for vm, _ in booted_on) == ["0", "1", "2"], output
    assert sorted(node for _, node in booted_on) == ["n1", "n2", "n3"], output  # spread
    # the guest API once: n1's z/VM API captures its guest, n2 boots the capture, it goes
    assert "zvmdemo: ZVMDEMO captured into the new base image zvmcap" in run.stdout, output
    booted = re.search(
        r"^vmtcluster: n2 booted a VM from zvmcap \(captured on n1\) in [0-9.]+ s through "
        r"Volt's tree of it, reading from n1's target; the image server sent ([0-9]+) bytes",
        run.stdout,
        re.M,
    )
    assert booted and int(booted.group(1)) < 256 << 10, output  # heartbeats, no image data
    assert "zvmdemo: image zvmcap deleted" in run.stdout, output
    with VirtualMachines(libvirt_daemons.uri) as vms:
        assert not [d.instance for d in vms.list() if d.instance.startswith(f"{LAB}-")]
    assert not [ns for ns in list_netns() if ns.startswith(f"{LAB}-")]
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
