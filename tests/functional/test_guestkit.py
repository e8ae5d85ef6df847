"""guestkit: the kernel-test guest, built from Debian packages (cached), booted as real nodes.

Guest A exports a file with tgtd; guest B logs in with iscsiadm, finds the disk through udev's
/dev/disk/by-path, reads it through a dm linear table and reports the bytes' sha256; B also
imports the project from the payload's copy. Every packet stays on the run's bridge inside
its own namespace: nothing here connects to a guest address. A missing QEMU (or build tool)
makes these tests fail, never skip.
"""

import configparser
import hashlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from brick.daemon import start_time as process_start_time
from brick.exception import InvalidArgument, NotFound
from brick.netns import list_netns
from brick.wait import wait_until
from guestkit import Guest, Node, RunResult, build_guest, cleanup_stale, run_guests
from guestkit.build import default_cache_dir
from guestkit.payload import write_payload

CHECKOUT = Path(__file__).resolve().parents[2]
IQN = "iqn.2026-12.org.vmthunder.guestkit:disk1"

RUN_SH = r"""#!/bin/sh
# A: tgt exporting /ci/disk.img on both bridges; B: an iSCSI session over each bridge, the
# disk found through udev's by-path links, a dm linear table over one, sha256 of the bytes.
set -u
IQN=__IQN__
log() { echo "[$CI_role $(cut -d' ' -f1 /proc/uptime)s] $*"; }
die() { log "FAIL: $*"; exit 1; }
retry() {  # retry N CMD...: run CMD every 0.5 s until it succeeds, at most N times
  n=$1; shift
  until "$@" >/dev/null 2>&1; do n=$((n - 1)); [ $n -gt 0 ] || return 1; sleep 0.5; done
}
case "$CI_role" in
A)
  mkdir -p /data && mount -t tmpfs -o size=64m tmpfs /data && cp /ci/disk.img /data/disk.img
  tgtd || die tgtd
  retry 40 tgtadm --lld iscsi --mode target --op show || die "tgtd not answering"
  tgtadm --lld iscsi --op new --mode target --tid 1 -T "$IQN" || die "new target"
  tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b /data/disk.img || die lun
  tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL || die bind
  log "target ready"
  msg=$(timeout 240 busybox nc -l -p 9999 </dev/null)
  log "got '$msg'"
  sha256sum /data/disk.img | cut -d' ' -f1 > /ci/out/sha256
  [ "$msg" = B-DONE ] || die "no B-DONE"
  ;;
B)
  modprobe -a iscsi_tcp dm-mod || die modprobe
  echo "InitiatorName=iqn.2026-12.org.vmthunder.guestkit:$CI_role" > /etc/iscsi/initiatorname.iscsi
  iscsid || die iscsid
  retry 240 iscsiadm -m discovery -t sendtargets -p 10.77.0.1:3260 || die "no target on A"
  iscsiadm -m discovery -t sendtargets -p 10.77.1.1:3260 || die "no target on A's 2nd NIC"
  iscsiadm -m node -T "$IQN" -p 10.77.0.1:3260 --login || die "login on bridge 0"
  iscsiadm -m node -T "$IQN" -p 10.77.1.1:3260 --login || die "login on bridge 1"
  dev=/dev/disk/by-path/ip-10.77.0.1:3260-iscsi-$IQN-lun-1
  dev1=/dev/disk/by-path/ip-10.77.1.1:3260-iscsi-$IQN-lun-1
  retry 60 test -b "$dev" -a -b "$dev1" || die "udev made no $dev and $dev1"
  log "disks $(readlink -f "$dev") $(readlink -f "$dev1")"
  dd if="$dev1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1 > /ci/out/sha256-path1
  size=$(blockdev --getsz "$dev")
  dmsetup create gk-linear --table "0 $size linear $dev 0" || die "dmsetup create"
  dmsetup table gk-linear
  dd if=/dev/mapper/gk-linear bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1 \
    > /ci/out/sha256
  log "sha256 $(cat /ci/out/sha256)"
  python3 -c 'import json, brick, virtman, sys
print(json.dumps({"brick": brick.__file__, "virtman": virtman.__file__,
                  "python": sys.executable}))' > /ci/out/import.json || die "import"
  dmsetup remove gk-linear || die "dmsetup remove"
  iscsiadm -m node -T "$IQN" --logout || die logout
  retry 60 sh -c 'echo B-DONE | busybox nc 10.77.0.1 9999' || die "cannot tell A"
  ;;
esac
log done
""".replace("__IQN__", IQN)

SLEEPER = """#!/bin/sh
sleep 600
"""

DRIVER = """
import signal
import sys
from guestkit import Node, build_guest, run_guests
# a job started in the background by a non-interactive shell inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
run_guests(build_guest(), [Node("S", 256, 1)], sys.argv[1], timeout_s=300)
"""


@pytest.fixture(scope="module")
def guest() -> Guest:
    """The cached guest (a cold build takes 1-2 minutes)."""
    return build_guest()


def leftovers(result: RunResult) -> list[str]:
    """Anything of this run still on the host: QEMU processes, namespace, links, state file."""
    found = []
    for node in result.nodes.values():
        if process_start_time(node.qemu_pid) is not None:
            cmdline = Path(f"/proc/{node.qemu_pid}/cmdline").read_bytes()
            if f"gk-{result.run_id}-".encode() in cmdline:
                found.append(f"QEMU pid {node.qemu_pid}")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"gk-{result.run_id}-".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(f"process {pid}")
        except OSError:
            continue
    if result.netns in list_netns():
        found.append(f"netns {result.netns}")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    ours = (f"gk{result.run_id}", "gkbr")
    found += [f"link {line}" for line in links.splitlines() if any(o in line for o in ours)]
    state = default_cache_dir() / "state" / f"gk-{result.run_id}.json"
    found += [f"state file {state}"] if state.exists() else []
    return found


@pytest.mark.timeout(900)
def test_two_guests_iscsi_dm_linear(guest: Guest, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "run.sh").write_text(RUN_SH)
    data = os.urandom(4 << 20)
    (payload / "disk.img").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()

    started = time.monotonic()
    result = run_guests(
        guest,
        [Node("A", 384, 1), Node("B", 512, 2)],
        payload,
        timeout_s=240,
        bridges=2,
        work_dir=tmp_path / "run",
    )
    print(result.summary(), f"(wall {time.monotonic() - started:.1f} s)")
    for node in result.nodes.values():
        print(f"--- {node.node.name} console ---\n{node.console_text()}")
    assert result.ok, result.summary()
    assert result["B"].result_text("sha256").strip() == expected
    assert result["B"].result_text("sha256-path1").strip() == expected
    assert result["A"].result_text("sha256").strip() == expected  # the export is unchanged
    imported = json.loads(result["B"].result_text("import.json"))
    assert imported["brick"] == "/ci/project/brick/__init__.py"
    assert imported["virtman"] == "/ci/project/virtman/__init__.py"
    assert imported["python"].startswith("/opt/vmt/venv/bin/python")
    assert result.project_digest
    assert leftovers(result) == []


def _start_driver(tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict]:
    """A separate process running one sleeping guest; returns it once its QEMU runs."""
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "run.sh").write_text(SLEEPER)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(payload)],
        cwd=CHECKOUT,
        stdout=open(tmp_path / "driver.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    state_dir = default_cache_dir() / "state"

    def running_state() -> dict | None:
        for path in state_dir.glob("gk-*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if state["owner"]["pid"] == proc.pid and state["qemu"]:
                return state
        return None

    state = wait_until(running_state, timeout_s=120, what="the driver's QEMU to start")
    return proc, state


def _gone(state: dict) -> list[str]:
    found = [f"netns {state['netns']}"] if state["netns"] in list_netns() else []
    for entry in state["qemu"]:
        if process_start_time(entry["pid"]) == entry["start"]:
            found.append(f"QEMU pid {entry['pid']}")
    state_file = default_cache_dir() / "state" / f"gk-{state['run']}.json"
    return found + ([f"state {state_file}"] if state_file.exists() else [])


@pytest.mark.timeout(300)
def test_ctrl_c_tears_down(guest: Guest, tmp_path: Path) -> None:
    proc, state = _start_driver(tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    assert _gone(state) == [], (tmp_path / "driver.log").read_text()


@pytest.mark.timeout(300)
def test_killed_run_is_cleaned_up_by_the_next(guest: Guest, tmp_path: Path) -> None:
    proc, state = _start_driver(tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    assert _gone(state) != []  # a kill -9 leaves QEMU, the namespace and the state file
    assert state["run"] in cleanup_stale()
    assert _gone(state) == []


@pytest.mark.timeout(300)
def test_wall_clock_timeout(guest: Guest, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "run.sh").write_text(SLEEPER)
    started = time.monotonic()
    result = run_guests(guest, [Node("S", 256, 1)], payload, timeout_s=8, work_dir=tmp_path / "r")
    assert time.monotonic() - started < 30
    assert not result.ok
    assert result["S"].timed_out and result["S"].killed and result["S"].rc is None
    assert leftovers(result) == []


def test_missing_qemu_fails(guest: Guest, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        run_guests(guest, [Node("A", 256, 1)], None, qemu="qemu-system-nonexistent")


@pytest.mark.parametrize("cpu", ["max -enable-kvm", "", ",max", "qemu64\n", 64])
def test_a_bad_cpu_model_is_refused_before_anything_is_made(
    guest: Guest, tmp_path: Path, cpu: object
) -> None:
    with pytest.raises(InvalidArgument, match="cpu"):
        bad: str = cpu  # type: ignore[assignment]
        run_guests(guest, [Node("A", 256, 1)], None, cpu=bad, work_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_node_specs() -> None:
    assert Node.parse("A:512:1") == Node("A", 512, 1)
    assert Node("B", 512, 2).addresses(2) == ["10.77.0.2/24", "10.77.1.2/24"]
    for bad in ("A:512", "A:x:1", "1A:512:1", "A:64:1", "A:512:0", "A:512:255"):
        with pytest.raises(ValueError):
            Node.parse(bad)


def test_payload_carries_the_project(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "run.sh").write_text("#!/bin/sh\n")
    digest = write_payload(
        tmp_path / "p.tar", tmp_path / "p", nodes=[("A", 1, 512, ["10.77.0.1/24"])]
    )
    with tarfile.open(tmp_path / "p.tar") as tar:
        names = set(tar.getnames())
        assert tar.getmember("./run.sh").mode & 0o111
        wrapper = tar.extractfile("./project/bin/virtmanserver").read().decode()
        tar.extractall(tmp_path / "ci", filter="data")
    assert "./project/virtman/__init__.py" in names
    assert "./project/virtman/__pycache__/__init__.cpython-311.pyc" in names
    assert "from virtman.cmd.server import main" in wrapper
    assert len(digest) == 64
    # entry points (Volt's executors) resolve from the payload's copy of the project
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path / "ci" / "project")])
    executors = {ep.name: ep.value for ep in dist.entry_points.select(group="volt.executor")}
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(CHECKOUT / "setup.cfg")
    assert dist.metadata["Name"] == "vmthunder"
    assert dist.version == setup_cfg["metadata"]["version"]
    assert executors["balanced"] == "volt.topology.balanced:BalancedExecutor"
