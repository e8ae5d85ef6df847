"""The main job, ``vmt-demo/vmtcluster.py``, run as a user runs it: real VMs boot on three
nodes through the whole stack, and nothing is left afterwards."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from brick.netns import list_netns
from tests.functional.vmfixtures import GUEST_CACHE, libvirt_daemons

pytestmark = pytest.mark.functional
__all__ = ["libvirt_daemons"]  # the fixture used here

SCRIPT = Path(__file__).parents[2] / "vmt-demo" / "vmtcluster.py"
LAST_LINE = re.compile(
    r"vmtcluster: 3 VMs booted on 3 nodes in [0-9.]+ s; image server sent ([0-9]+) bytes, "
    r"peers sent ([0-9]+) bytes; verified"
)


@pytest.mark.timeout(600)
def test_vmtcluster_three_nodes_one_vm_each(tmp_path: Path, libvirt_daemons) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--nodes", "3", "--vms-per-node", "1",
         "--workdir", str(tmp_path / "run"), "--cache-dir", str(GUEST_CACHE)],
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
    for vm in ("vm-n1-1", "vm-n2-1", "vm-n3-1"):
        assert f"vmtcluster: {vm} booted" in run.stdout, output
    assert not [ns for ns in list_netns() if ns.startswith("vmtc-")]
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
