"""Small runs of the provisioning benchmark (bench/provision.py), the tiny guest's recorded
boot replayed: 4 nodes on links shaped to 1 Gbit/s (VMThunder's image-server egress must be
below the direct variant's, and every variant must boot every node); and a sweep over N = 1, 2
behind a thin image-server link (every point of every variant in the JSON, a PNG plot)."""

from __future__ import annotations

import json
import os
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


SWEEP_LAST = re.compile(
    r"provision: sweep 2 points, nodes 1,2, server 4 Mbit/s, plot (\S+), json (\S+)"
)
# One sweep's lab: VMT_TEST_LAB / VMT_TEST_TGT_BASE let two checkouts run it at once.
SWEEP_LAB = os.environ.get("VMT_TEST_LAB", "vmtw")
SWEEP_TGT_BASE = os.environ.get("VMT_TEST_TGT_BASE", "3650")


@pytest.mark.timeout(600)
def test_provision_sweep(tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--sweep-nodes", "1,2", "--server-mbit", "4",
         "--node-mbit", "1000", "--guest", "tiny", "--variants", "direct,balanced",
         "--workdir", str(tmp_path / "run"), "--cache-dir", str(GUEST_CACHE),
         "--json", str(out), "--plot", str(png), "--lab", SWEEP_LAB,
         "--subnet", "10.237.0.0/24", "--tgt-base", SWEEP_TGT_BASE],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert SWEEP_LAST.fullmatch(lines[-1]), lines[-1]
    # every point still prints a single run's last line
    assert sum(1 for line in lines if re.match(r"provision: nodes [12] vmthunder p99 ", line)) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    sweep = json.loads(out.read_text())
    assert sweep["variants"] == ["single", "direct", "balanced"]
    boot_set = sweep["boot_read_bytes"]
    points = {p["nodes"]: p for p in sweep["points"]}
    assert sorted(points) == [1, 2]
    for n, point in points.items():
        assert point["server_mbit"] == 4 and point["node_mbit"] == 1000
        results = {r["variant"]: r for r in point["results"]}
        assert sorted(results) == ["balanced", "direct", "single"]
        for name, r in results.items():
            assert len(r["times"]) == (1 if name == "single" else n), r
        assert results["direct"]["image_server_sent"] >= n * boot_set
    # the image server's link is shaped: two direct readers need 2 boot sets of its link time
    direct = next(r for r in points[2]["results"] if r["variant"] == "direct")
    assert direct["p99"] >= 0.8 * 2 * boot_set * 8 / 4e6, direct
    simulated = {(r["variant"], r["nodes"]): r["p99"] for r in sweep["simulated"]}
    assert sorted(simulated) == [
        ("balanced", 1), ("balanced", 2), ("direct", 1), ("direct", 2), ("single", 1),
    ]  # fmt: skip
    assert all(t > 0 for t in simulated.values())
    assert not [ns for ns in list_netns() if ns.startswith(f"{SWEEP_LAB}-")]
