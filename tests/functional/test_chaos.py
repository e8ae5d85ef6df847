"""A short chaos run (bench/chaos.py): 4 nodes, 6 rounds of SIGKILLed daemons and cut links
under checksummed disk I/O; no reader error, no lost byte, nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from brick.netns import list_netns
from tests.functional.clusterfixtures import LAB, TGT_BASE

pytestmark = pytest.mark.functional

SCRIPT = Path(__file__).parents[2] / "bench" / "chaos.py"
LAST = re.compile(
    r"chaos: (\d+) rounds, (\d+) kills, (\d+) reader I/O errors, (\d+) lost or wrong bytes, "
    r"(\d+) s"
)


@pytest.mark.timeout(420)
def test_chaos_short_run(tmp_path: Path) -> None:
    workdir = tmp_path / "chaos"
    lab = f"{LAB}x"  # the cluster fixtures' lab may be in use by another test of this run
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "6", "--nodes", "4", "--seed", "97",
         "--image-mib", "64", "--workdir", str(workdir), "--lab", lab,
         "--tgt-base", str(TGT_BASE + 50)],
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    out = run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    match = LAST.fullmatch(last)
    assert match, out
    rounds, kills, errors, wrong, _ = (int(g) for g in match.groups())
    assert (rounds, errors, wrong) == (6, 0, 0), out
    # Seed 97: qsd, tgtd of the image server and of a node, volt-api, virtmanserver, a link.
    assert kills >= 4, out
    for what in ("virtmanserver", "qsd", "tgtd", "volt-api"):
        assert f"SIGKILL {what} pid" in out, f"seed 97 no longer kills {what}:\n{out}"
    assert "CHECK FAILED" not in out, out
    assert run.returncode == 0, out
    assert not [ns for ns in list_netns() if ns.startswith(f"{lab}-")]
    assert not workdir.exists(), "a clean run removes its work directory"
