"""The dm driver on real kernels: QEMU guests (guestkit) as an image server and 3 nodes.

S runs tgtd (the image, CHAP) and volt-api; A, B and C run OUR virtmanserver with
driver = dm and create one VM disk each through their own XML-RPC API. Volt's balanced
placement (fan-out 2) puts A and B under the image server and C under A, with B as C's
standby parent: C is the grandchild and reads through A's LIO relay. All four guests boot
once for the module; each test checks one part of what they report. Every packet stays on
the run's bridge inside the namespace guestkit creates: nothing here connects to a guest.
A missing QEMU fails these tests, it never skips them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from guestkit import Node, RunResult
from tests.functional.guestruns import (
    NOTHING_LEFT,
    TEST_TIMEOUT_S,
    assert_every_guest_passed,
    module_fixtures,
)
from tests.functional.guestside import contract

SIZE_MIB = 24
SIZE = SIZE_MIB << 20
WORK_DIR = Path(__file__).resolve().parents[2] / ".work" / "dm-guests"  # the last run's logs
NODES = [Node("S", 640, 1), Node("A", 768, 2), Node("B", 768, 3), Node("C", 768, 4)]


CACHE_ENGINES = Path(__file__).resolve().parents[2] / "bench" / "cache_engines.py"
run, report = module_fixtures(
    __name__, NODES, "dmguest.py", work_dir=WORK_DIR, size_mib=SIZE_MIB, files=[CACHE_ENGINES]
)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_every_guest_passes(run: RunResult, report: dict[str, dict[str, Any]]) -> None:
    assert_every_guest_passed(run, report)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_each_snapshot_reads_the_image_and_keeps_its_writes(
    report: dict[str, dict[str, Any]],
) -> None:
    for name in "ABC":
        r = report[name]
        assert r.get("create") == f"0:/dev/mapper/snapshot_vm-{name.lower()}", r.get("error")
        assert r["list"] == [f"vm-{name.lower()}:volume-img"]
        assert r["private"] == {
            "readback": True,
            "disk_differs": True,
            "cached": True,
            "origin": True,
        }


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_grandchild_reads_through_its_parents_lio_relay(
    report: dict[str, dict[str, Any]],
) -> None:
    assert report["A"]["paths"] == ["10.77.0.1:3260"]  # A and B read the image server
    assert report["B"]["paths"] == ["10.77.0.1:3260"]
    assert report["C"]["paths"] == ["10.77.0.2:3260", "10.77.0.3:3260"]  # A, then B standby
    assert report["A"]["lio_sessions"] == ["iqn.2026-12.org.vmthunder.guestkit:c"]


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_parent_path_going_down_fails_no_read(report: dict[str, dict[str, Any]]) -> None:
    failover = report["C"]["failover"]
    print(failover)
    assert failover["errors"] == []
    assert failover["sha_ok"]
    assert failover["failed_paths_seen"]  # the path to A did fail ...
    assert failover["read_mib"] == SIZE_MIB > failover["down_at_mib"]  # ... under the reads
    after = failover["status_after"]  # the path is reinstated, the first group used again
    assert "active=False" not in after and after.index("state='A'") < after.index("state='E'")


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_kill9_of_virtman_then_restart_adopts_everything(
    report: dict[str, dict[str, Any]],
) -> None:
    restart = report["A"]["restart"]
    assert restart["list_before"] == restart["list_after"] == ["vm-a:volume-img"]
    assert restart["same_tables"] and restart["same_sessions"] and restart["same_lio"]
    assert restart["before"]["lio"] == ["iqn.2010-10.org.openstack:volume-img"]


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_teardown_leaves_no_table_session_target_or_loop(
    report: dict[str, dict[str, Any]],
) -> None:
    for name in "ABC":
        r = report[name]
        assert r["destroy"] == "0:" and r["stop_rc"] == 0
        assert r["left"] == NOTHING_LEFT, name


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_bcache_serves_the_second_read_locally(report: dict[str, dict[str, Any]]) -> None:
    # A and B read the image server: the first read fetches the image once, later reads
    # what bcache dropped (see docs/dm-driver.rst). C's first read was the failover read.
    for name in "AB":
        first, second, third = report[name]["fetched"]
        print(name, "fetched upstream per full read:", report[name]["fetched"])
        assert SIZE * 0.9 <= first <= SIZE
        assert second <= SIZE * 0.05
        assert third <= second
    assert max(report["C"]["fetched"]) <= SIZE * 0.05


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_cache_engine_measurement(run: RunResult) -> None:
    """The comparison behind the choice (docs/dm-driver.rst), on 16 MiB: bytes fetched
    upstream by three full sequential reads of a fresh cache."""
    rows = json.loads(run["S"].result_text("measure.json"))
    fetched = {
        (r["engine"], r["pattern"]): [p["upstream_bytes"] for p in r["passes"]] for r in rows
    }
    for (engine, pattern), passes in sorted(fetched.items()):
        print(f"{engine:60} {pattern:18} {passes}")
    size = 16 << 20
    seq = "sequential 1 MiB"
    smq = fetched[("dm-cache smq, 256 KiB blocks (default)", seq)]
    big = fetched[("bcache writethrough, sequential_cutoff 0, 64 GiB cache", seq)]
    writecache = fetched[("dm-writecache", seq)]
    # smq caches on read only as time passes between reads (docs/dm-driver.rst: 99 % of a
    # second pass back to back, 36 % 3 s later; 33 % under CI load): only its first read is
    # certain here. What chose bcache is the second pass below, not smq's.
    assert smq[0] >= size * 0.9
    # bcache skips some inserts (more under CPU contention: the other guests run beside
    # it); the second read fetched 2.4-10.5 % of the first in runs here, the third less.
    # Its first read may fetch a little past the 16 MiB (its own readahead on the backing
    # device: 17,358,848 bytes, +3.5 %, in one CI run), never the image twice.
    assert big[0] <= size * 1.05 and big[1] <= size * 0.25 and big[2] <= big[1]
    assert writecache == [size, size, size]  # a write cache: every read goes upstream


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("case", sorted(contract.CASES))
def test_the_layer_contract_holds_on_the_dm_driver(
    report: dict[str, dict[str, Any]], case: str
) -> None:
    """The cases test_driver_contract.py runs against the qemu driver, run by node C
    against a DmDriver once its own VM is destroyed and its virtmanserver stopped;
    they leave nothing behind."""
    outcome = report["C"].get("contract", {})
    assert outcome.get(case) == "ok", outcome
    assert report["C"]["contract_left"] == NOTHING_LEFT
