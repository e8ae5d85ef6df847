"""A small run of the provisioning benchmark (bench/provision.py): 4 nodes, the tiny guest's
recorded boot replayed, on links shaped to 1 Gbit/s; VMThunder's image-server egress must be
below the direct variant's, and every variant must boot every node."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from brick.netns import list_netns
from tests.functional.vmfixtures import GUEST_CACHE

pytestmark = pytest.mark.functional

SCRIPT = Path(__file__).parents[2] / "bench" / "provision.py"
LAST = re.compile(
    r"provision: nodes 4 vmthunder p99 [0-9.]+ s \([0-9.]+x single\), full-copy p99 [0-9.]+ s, "
    r"direct p99 [0-9.]+ s, image-server egress ([0-9]+) MB vs ([0-9]+) MB direct"
)


@pytest.mark.timeout(600)
def test_provision_four_nodes(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--nodes", "4", "--guest", "tiny",
         "--workdir", str(tmp_path / "run"), "--cache-dir", str(GUEST_CACHE),
         "--json", str(out), "--lab", "vmtq", "--subnet", "10.237.0.0/24", "--tgt-base", "3650"],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert LAST.fullmatch(last), last
    results = {r["variant"]: r for r in json.loads(out.read_text())}
    assert sorted(results) == ["balanced", "btree", "direct", "full", "prefetch", "single"]
    for name, r in results.items():
        assert len(r["times"]) == (1 if name == "single" else 4), r
    boot_set = results["single"]["read_bytes"]
    direct, vmt = results["direct"], results["balanced"]
    assert direct["image_server_sent"] >= 4 * boot_set
    assert vmt["image_server_sent"] < direct["image_server_sent"]
    assert vmt["image_server_sent"] <= 3 * boot_set * 1.5  # (top level 2 + 1), 64 KiB clusters
    assert vmt["peers_sent"] > 0
    # prefetching from the parents, not from the image server
    assert results["prefetch"]["image_server_sent"] <= 3 * boot_set * 1.5
    assert results["full"]["image_server_sent"] >= 4 * (64 << 20)  # the whole image, 4 times
    assert not [ns for ns in list_netns() if ns.startswith("vmtq-")]
