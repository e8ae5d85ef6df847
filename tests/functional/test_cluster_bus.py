"""Issue 13, Build 3: the cluster controller dispatches over the control bus. A local
cluster (volt-api with its controller, an image server, compute nodes with the qemu driver
serving the tiny guest under libvirt/QEMU, a private RabbitMQ in the volt host's namespace)
takes one ``POST /v1/clusters`` (``vmt-demo/vmtburst.py`` in the control host):

- 8 VMs on 4 nodes: every VM boots and its console shows the image's marker; the poll saw
  progress, then DONE; every guest verb was answered over the bus, and the nodes' progress
  notifications (which only travel over the bus) are in the task; the image server sent
  at most (the tree's top + 1) images.
- RabbitMQ killed (by PID) mid-burst, then started again: the burst completes, each VM on
  one node, once (one guest record, one domain); the controller logged the outage once
  and the bus's return.

Run with your own lab names: VMT_TEST_LAB=<lab> VMT_TEST_TGT_BASE=<port>.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brick.wait import wait_until
from tests.functional import vmfixtures
from tests.functional.clusterfixtures import LAB
from virtman.guest.domains import VirtualMachines
from volt.cluster import busdispatch

pytestmark = pytest.mark.functional
libvirt_daemons = vmfixtures.libvirt_daemons
guest_image = vmfixtures.guest_image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "vmt-demo"))

import guestimage  # noqa: E402

BURST = ROOT / "vmt-demo" / "vmtburst.py"
IMAGE = "image1"
PREFIX = f"{LAB}-"  # the nodes' guest_name_prefix: domains vmt-<LAB>-<USERID>
ACTION_SNIPPET = (  # POST /v1/vms/{vm}/action from the control host
    "import json, sys, urllib.request\n"
    "url, token_file, vm, action = sys.argv[1:5]\n"
    "token = open(token_file).read().strip()\n"
    "req = urllib.request.Request(f'{url}/v1/vms/{vm}/action', method='POST',\n"
    "    data=json.dumps({'action': action}).encode(),\n"
    "    headers={'X-Auth-Token': token, 'Content-Type': 'application/json'})\n"
    "print(urllib.request.urlopen(req, timeout=30).status)\n"
)
BOOT_S = 400.0  # the tiny guest boots in ~4 s under TCG on an idle host; far slower when loaded


class Burst:
    """A started cluster with the tiny guest exported as ``image1``."""

    def __init__(self, cluster: Any, workdir: Path, guest: Any, uri: str) -> None:
        self.cluster = cluster
        self.guest = guest
        self.uri = uri
        self.image = workdir / f"{IMAGE}.raw"  # under the image server's image_dirs
        shutil.copyfile(guest.rootfs, self.image)
        answer = cluster.rpc("img", "create_image_target", IMAGE, str(self.image))
        assert answer.startswith("0:"), answer
        self.token_file = workdir / "admin-token"
        self.token_file.touch(mode=0o600)
        self.token_file.write_text(cluster.token)
        self.result = workdir / "burst.json"
        self.volt = f"http://{cluster.hosts['volt'].address}:7447"
        for node in cluster.node_names:  # every node listens on its bus queue
            wait_until(
                lambda node=node: "listening on vmthunder-node." in self.node_log(node),
                timeout_s=60,
                what=f"{node} on the bus",
            )

    def node_log(self, node: str) -> str:
        log = self.cluster.node_dir(node) / "virtman.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def volt_log(self) -> str:
        return self.cluster.daemons["volt"].log_text()

    def argv(self, count: int, nodes: int) -> list[str]:
        return [
            sys.executable, str(BURST), "--volt", self.volt, "--token-file", str(self.token_file),
            "--timeout", "300", "start", IMAGE, "--count", str(count), "--vcpus", "1",
            "--memory-mb", "128", "--name", "vm", "--nodes-up", str(nodes),
            "--result", str(self.result),
        ]  # fmt: skip

    def answered_over_the_bus(self) -> int:
        """Guest verbs the controller got its answer to over the bus so far (its store)."""
        store = self.cluster.workdir / "volt" / "volt.sqlite"
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            try:
                (count,) = db.execute(
                    "SELECT count(*) FROM volt_cluster_events"
                    " WHERE event = 'dispatch' AND detail = 'bus'"
                ).fetchone()
            except sqlite3.OperationalError:  # locked by a writer now: ask again
                return 0
        return int(count)

    def view(self) -> dict[str, Any]:
        return dict(json.loads(self.result.read_text()))

    def booted(self, vms: list[dict[str, Any]]) -> None:
        """Every VM's console (the node's guest_console_output) shows the image's marker:
        it booted from its disk and read it."""
        consoles: dict[str, str] = {}

        def all_booted() -> bool:
            for vm in vms:
                text = self.cluster.rpc(vm["node"], "guest_console_output", vm["userid"])
                consoles[vm["name"]] = text
                fields = guestimage.parse_marker(text)
                if fields is None:
                    return False
                assert self.guest.marker_matches(fields), (vm["name"], fields)
            return True

        try:
            wait_until(all_booted, timeout_s=BOOT_S, what="every VM's console marker")
        except Exception:
            for name, text in consoles.items():
                print(f"--- {name} console tail:\n{text[-600:]}")
            raise

    def once_each(self, vms: list[dict[str, Any]]) -> None:
        """Each VM is a guest on its node only, with one domain: never started twice."""
        where: Counter[str] = Counter()
        for node in self.cluster.node_names:
            for userid in self.cluster.rpc(node, "guest_list"):
                where[userid] += 1
                assert any(vm["userid"] == userid and vm["node"] == node for vm in vms), userid
        assert where == {vm["userid"]: 1 for vm in vms}
        with VirtualMachines(self.uri) as conn:
            domains = [d.instance for d in conn.list() if d.instance.startswith(PREFIX)]
        assert sorted(domains) == sorted(PREFIX + vm["userid"] for vm in vms)

    def destroy(self) -> None:
        """The task through the controller, then any domain of ours it left."""
        if self.result.exists():
            task = self.view()["task"]
            self.cluster.hosts["ctl"].run(
                [sys.executable, str(BURST), "--volt", self.volt, "--token-file",
                 str(self.token_file), "delete", task],
                timeout_s=120, check_exit_code=False,
            )  # fmt: skip
        with VirtualMachines(self.uri) as conn:
            for info in conn.list():
                if info.instance.startswith(PREFIX):
                    conn.destroy(info.instance)


@pytest.fixture
def burst_cluster(cluster_factory, libvirt_daemons, guest_image, tmp_path) -> Iterator[Any]:
    made: list[Burst] = []

    def make(nodes: int, call_timeout_s: int = 15) -> Burst:
        guest = guest_image
        conf = (
            f"guest_libvirt_uri = {libvirt_daemons.uri}\nguest_kernel = {guest.kernel}\n"
            f"guest_initrd = {guest.initrd}\nguest_cmdline = {guest.cmdline} vmt.stay\n"
            f"guest_name_prefix = {PREFIX}\n"
        )
        cluster = cluster_factory(
            nodes,
            bus=True,
            controller=True,
            node_conf={f"n{i + 1}": conf for i in range(nodes)},
            controller_conf=f"bus_call_timeout = {call_timeout_s}\n",
        )
        made.append(Burst(cluster, tmp_path, guest, libvirt_daemons.uri))
        return made[-1]

    yield make
    for burst in made:
        burst.destroy()


def progress_lines(stdout: str) -> list[str]:
    return [
        line for line in stdout.splitlines() if line.startswith("vmtburst: ") and " VMs: " in line
    ]


@pytest.mark.timeout(900)
def test_a_burst_of_8_on_4_nodes_goes_over_the_bus(burst_cluster) -> None:
    # Every verb must go over the bus: a call that outlives the bus timeout falls back to
    # XML-RPC (the next test's subject), which a loaded CI host caused once at 15 s.
    burst = burst_cluster(4, call_timeout_s=60)
    cluster = burst.cluster
    sent_before = cluster.tx_bytes("img")
    run = cluster.hosts["ctl"].run(burst.argv(8, 4), timeout_s=300, check_exit_code=False)
    assert run.exit_code == 0, run.stdout + run.stderr
    view = burst.view()
    vms = view["vms"]
    assert view["status"] == "DONE" and len(vms) == 8, view
    assert Counter(vm["node"] for vm in vms) == {f"n{i}": 2 for i in range(1, 5)}
    lines = progress_lines(run.stdout)
    assert len(lines) >= 2 and "8 running" not in lines[0], lines  # progress, then success
    assert "0 placed, 0 deploying, 8 running, 0 failed" in lines[-1], lines
    burst.booted(vms)
    image_sent = cluster.tx_bytes("img") - sent_before

    # over the bus: every verb answered there, and each node's notifications in the task
    for vm in vms:
        assert vm["dispatch"] == {"bus": 3, "xmlrpc": 0}, vm
        host = cluster.hosts[vm["node"]].address
        from_node = [e for e in vm["events"] if e["source"] == host]
        assert ("guest_deploy_once", "done") in {(e["step"], e["detail"]) for e in from_node}, vm
    calls = sum(burst.node_log(n).count("guest call over the bus: ") for n in cluster.node_names)
    assert calls >= 8 * 3, calls
    assert "the bus is unreachable" not in burst.volt_log()
    burst.once_each(vms)

    # the image server's bytes: at most one image per top node of the tree, plus one
    tree = cluster.volt_tree(f"volume-{IMAGE}")
    assert {n["host"] for n in tree} == {cluster.hosts[n].address for n in cluster.node_names}
    top = [n for n in tree if n["depth"] == 1]
    size = burst.image.stat().st_size
    assert 0 < image_sent <= (len(top) + 1) * size, (image_sent, len(top), size)
    print(
        f"\nbus burst: 8 VMs on 4 nodes; image server sent {image_sent / size:.2f} images "
        f"({len(top)} nodes at the top); {calls} guest calls over the bus"
    )


@pytest.mark.timeout(900)
def test_a_burst_survives_rabbitmq_killed_and_restarted(burst_cluster, tmp_path) -> None:
    burst = burst_cluster(2)
    cluster = burst.cluster
    log = tmp_path / "vmtburst.log"
    proc = cluster.hosts["ctl"].spawn(burst.argv(4, 2), log)
    try:
        wait_until(
            lambda: burst.answered_over_the_bus() > 0,
            timeout_s=60,
            what="a first guest verb answered over the bus",
        )
        assert cluster.rabbitmq is not None
        killed = cluster.rabbitmq.kill()
        assert killed is not None
        wait_until(
            lambda: "cluster dispatch: the bus is unreachable" in burst.volt_log(),
            timeout_s=30,
            what="the controller to see the bus down",
        )
        cluster.start_rabbitmq()
        assert proc.wait(timeout=240) == 0, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    view = burst.view()
    vms = view["vms"]
    assert view["status"] == "DONE" and len(vms) == 4, view
    assert all(vm["attempts"] == 1 for vm in vms), vms  # none moved, none retried
    burst.booted(vms)
    burst.once_each(vms)
    dispatch = Counter()
    for vm in vms:
        dispatch.update(vm["dispatch"])
    assert dispatch["xmlrpc"] > 0 and dispatch["bus"] > 0, dispatch  # both, across the outage
    wait_until(
        lambda: "cluster dispatch: the bus works again" in burst.volt_log(),
        timeout_s=30,
        what="the controller to see the bus back",
    )
    back = time.monotonic()
    text = burst.volt_log()
    assert text.count("cluster dispatch: the bus is unreachable") == 1, text[-3000:]

    # back on the bus: a per-VM action once the controller uses it again goes over it
    vm = vms[0]
    over_bus = f"guest call over the bus: guest_action({vm['userid']}) done"
    before = burst.node_log(vm["node"]).count(over_bus)
    wait_until(
        lambda: time.monotonic() - back > busdispatch.RECOVERY_GRACE_S,
        timeout_s=busdispatch.RECOVERY_GRACE_S + 1,
        what="the controller's recovery grace",
    )
    argv = [sys.executable, "-c", ACTION_SNIPPET, burst.volt, str(burst.token_file),
            vm["userid"], "suspend"]  # fmt: skip
    assert cluster.hosts["ctl"].run(argv, timeout_s=60).stdout.strip() == "202"
    wait_until(
        lambda: (
            burst.node_log(vm["node"]).count(over_bus) > before
            and cluster.rpc(vm["node"], "guest_power_state", vm["userid"]) == "paused"
        ),
        timeout_s=30,
        what="the suspend, over the bus",
    )
    print(f"\nrabbitmq (pid {killed}) killed mid-burst: 4 VMs done; answered {dict(dispatch)}")
