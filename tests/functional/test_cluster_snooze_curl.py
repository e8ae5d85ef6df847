"""Issue 13, Build 2: the seed's own curl lines (seeds/003), unchanged, against volt-api's
Snooze routes, and a migrateVirtualMachine with the seed's body. They name localhost:5001
(group manager) and localhost:5000 (bootstrap), so the run gets its own network namespace:
volt-api (noauth, as Snooze has no credentials) listens on 127.0.0.1:5001 there, socat
forwards 5000 to it, and two fake nodes answer the guest API (tests/functional/fakenode.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from brick.wait import wait_until
from tests.functional.voltproc import VOLT_API, VoltProcess

pytestmark = pytest.mark.functional
LAB = os.environ.get("VMT_TEST_LAB", "vmt")
ROOT = Path(__file__).resolve().parents[2]
SEED_START = ROOT / "tests/unit/volt/data/snooze_start_virtual_cluster.json"
SEED_RESPONSE = ROOT / "tests/unit/volt/data/snooze_virtual_cluster_response.json"
SEED_LIST = ROOT / "tests/unit/volt/data/snooze_local_controller_list.json"
# The seed's lines; only the example task id of the second is replaced by the real one.
START = ('curl -H "Content-Type: application/json" -X POST -d "$template" '
         "http://localhost:5001/groupmanager?startVirtualCluster")  # fmt: skip
POLL = ('curl -H "Content-Type: application/json" -X POST -d "{task}" '
        "http://localhost:5001/groupmanager?getVirtualClusterResponse")  # fmt: skip
LIST = "curl localhost:5000/bootstrap?getLocalControllerList"
# The seed gives migrate's body, not a curl line: this one is in the style of the others.
MIGRATE = ('curl -H "Content-Type: application/json" -X POST -d "$body" '
           "http://localhost:5001/groupmanager?migrateVirtualMachine")  # fmt: skip


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"{LAB}-snz-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def keys(value: object) -> object:
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [keys(value[0])]
    return None


def covers(ours: object, theirs: object) -> bool:
    """Every key of the seed's document is in ours (recursively)."""
    if isinstance(theirs, dict):
        return isinstance(ours, dict) and all(
            k in ours and covers(ours[k], v) for k, v in theirs.items()
        )
    if isinstance(theirs, list):
        return isinstance(ours, list) and bool(ours) and covers(ours[0], theirs[0])
    return True


def test_seed_curl_lines_work_unchanged(netns: str) -> None:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*argv: str, log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
        out.close()
        procs.append(proc)
        return proc

    def sh(line: str, **env: str) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", netns, "bash", "-c", line], capture_output=True,
            text=True, env={**os.environ, **env}, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    with tempfile.TemporaryDirectory(prefix="vmt-snooze-") as folder:
        work = Path(folder)
        nodes = [{"id": f"lc{i}", "url": f"http://127.0.0.1:{7774 + i}/RPC2"} for i in (1, 2)]
        (work / "nodes.json").write_text(json.dumps(nodes))
        volt = VoltProcess(work, token=None, bind_port="5001",
                           cluster__nodes_file=work / "nodes.json")  # fmt: skip
        try:
            for i in (1, 2):
                spawn(sys.executable, "-m", "tests.functional.fakenode", str(7774 + i),
                      log=work / f"node{i}.log")  # fmt: skip
            spawn(*VOLT_API, "--config-file", str(volt.config_path), log=work / "volt.out")
            spawn("socat", "TCP-LISTEN:5000,bind=127.0.0.1,fork,reuseaddr",
                  "TCP:127.0.0.1:5001", log=work / "socat.log")  # fmt: skip
            wait_until(
                lambda: all(p.poll() is None for p in procs)
                and sh("curl -s -o /dev/null -w '%{http_code}' localhost:5000/ || true")
                == "300",
                timeout_s=30, what="volt-api and socat in the namespace", max_interval_s=0.1,
            )  # fmt: skip

            task = sh(START, template=SEED_START.read_text()).strip()
            assert str(uuid.UUID(task)) == task

            def polled() -> dict | None:
                text = sh(POLL.format(task=task))
                return json.loads(text) if text else None

            answer = wait_until(polled, timeout_s=20, what="the response", max_interval_s=0.1)
            assert covers(keys(answer), keys(json.loads(SEED_RESPONSE.read_text()))), answer
            (vm,) = answer["virtualMachineMetaData"]
            assert vm["status"] == "RUNNING" and answer["errorCode"] is None
            location = vm["virtualMachineLocation"]
            assert location["virtualMachineId"] == "debian1"
            assert location["groupManagerControlDataAddress"] == {"address": "127.0.0.1",
                                                                  "port": 5001}  # fmt: skip

            listed = json.loads(sh(LIST))
            assert covers(keys(listed), keys(json.loads(SEED_LIST.read_text()))), listed
            controllers = listed["localControllers"]
            assert [(c["id"], c["status"]) for c in controllers] == [
                ("lc1", "ACTIVE"), ("lc2", "ACTIVE")]  # fmt: skip
            assert [c["controlDataAddress"]["port"] for c in controllers] == [7775, 7776]
            assert sum(len(c["assignedVirtualMachines"]) for c in controllers) == 1

            # migrate, as the seed's libcloud does: the destination is another location
            other = next(c["id"] for c in controllers if c["id"] != location["localControllerId"])
            body = {"sourceVirtualMachineLocation": location,
                    "destinationVirtualMachineLocation": {**location, "localControllerId": other},
                    "destinationHypervisorSettings": {}, "migrated": False}  # fmt: skip
            assert json.loads(sh(MIGRATE, body=json.dumps(body))) is True

            def moved() -> bool:
                listed = json.loads(sh(LIST))["localControllers"]
                return {c["id"]: c["assignedVirtualMachines"] for c in listed}[other] == ["debian1"]

            wait_until(moved, timeout_s=20, what="the migration", max_interval_s=0.1)
            (vm,) = json.loads(sh(POLL.format(task=task)))["virtualMachineMetaData"]
            assert vm["virtualMachineLocation"]["localControllerId"] == other
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
