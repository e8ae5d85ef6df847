"""Issue 13, Builds 1-2 (first slice): one ``POST /v1/clusters`` of 4 VMs on 2 real
virtmanservers (real libvirtd + QEMU TCG, the tiny guest), served by a real volt-api.

Each node exports the tiny image itself (a guest's deploy reads a local export today); the
controller places the burst 2 + 2, brings every VM up through the nodes' guest API, the
guests boot (their console markers), ``GET /v1/nodes`` shows the use, and ``DELETE`` leaves
no guest, snapshot or domain behind. A third node that accepts connections and never answers
is in the nodes file: it costs ``POST /v1/clusters`` nothing (the capacity cache asks in the
background) and gets no VM. Per-VM actions reach the real guests: suspend pauses the domain,
Snooze's resumeVirtualMachine resumes it, a per-VM destroy removes one guest.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from brick.wait import wait_until
from tests.functional import vmfixtures
from tests.functional.virtmanproc import VirtmanProcess
from tests.functional.vmfixtures import domain_gone
from tests.functional.voltproc import VoltProcess

pytestmark = pytest.mark.functional
libvirt_daemons = vmfixtures.libvirt_daemons
guest_image = vmfixtures.guest_image

LAB = os.environ.get("VMT_TEST_LAB", "vmt")
BOOT_S = 120.0


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmt-cluster-") as folder:
        yield Path(folder)


def test_cluster_burst_of_4_on_2_nodes_runs_spread_2_2_then_destroys(
    libvirt_daemons, guest_image, workdir: Path
) -> None:
    guest = guest_image
    nodes: dict[str, VirtmanProcess] = {}
    for name in ("na", "nb"):
        nodes[name] = VirtmanProcess(
            workdir / name,
            guest_libvirt_uri=libvirt_daemons.uri,
            guest_kernel=guest.kernel,
            guest_initrd=guest.initrd,
            guest_cmdline=f"{guest.cmdline} vmt.stay",
            guest_name_prefix=f"{LAB}{os.getpid()}{name}-",
            heartbeat_interval=1,
        )
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    nodes_file = workdir / "nodes.json"
    nodes_file.write_text(
        json.dumps(
            [
                {"id": name, "url": n.url, "token": n.token, "vcpus": 2, "memory_mb": 512}
                for name, n in nodes.items()
            ]
            + [{"id": "nz", "url": f"http://127.0.0.1:{silent.getsockname()[1]}/RPC2"}]
        )
    )
    (workdir / "volt").mkdir()
    volt = VoltProcess(workdir / "volt", cluster__nodes_file=nodes_file)
    started = time.monotonic()
    try:
        for node in nodes.values():
            node.start()
            image = node.image_dir / "tiny.raw"
            shutil.copy(guest.rootfs, image)
            assert node.client().call("create_image_target", "tiny", str(image)).startswith("0:")
        volt.start()

        def both_up() -> list | None:
            status, listed = volt.request("GET", "/v1/nodes")
            assert status == 200, listed
            return listed if [n["status"] for n in listed[:2]] == ["up", "up"] else None

        listed = wait_until(both_up, timeout_s=10, what="na and nb up", max_interval_s=0.1)
        assert [n["id"] for n in listed] == ["na", "nb", "nz"]
        assert listed[2]["status"] in ("unknown", "down") and listed[2]["capacity"] is None
        assert all(n["capacity"]["vcpus"] <= 2 for n in listed[:2])

        burst = {"image": "tiny", "count": 4, "flavor": {"vcpus": 1, "memory_mb": 128}}
        t0 = time.monotonic()
        status, answer = volt.request("POST", "/v1/clusters", burst)
        post_s = time.monotonic() - t0
        assert status == 202, answer
        assert post_s < 1.0, f"POST /v1/clusters took {post_s:.2f} s with a silent node"
        task = answer["task"]
        seen: set[str] = set()

        def done() -> dict | None:
            status, view = volt.request("GET", f"/v1/clusters/{task}")
            assert status == 200, view
            seen.update(vm["status"] for vm in view["vms"])
            return view if view["status"] != "IN_PROGRESS" else None

        view = wait_until(done, timeout_s=BOOT_S, what="the burst", max_interval_s=0.2)
        dispatch_s = time.monotonic() - t0
        assert view["status"] == "DONE", view
        assert Counter(vm["node"] for vm in view["vms"]) == {"na": 2, "nb": 2}
        assert {vm["status"] for vm in view["vms"]} == {"RUNNING"}
        assert "PENDING" in seen or "CREATING" in seen or "DEPLOYING" in seen  # progress seen

        # every guest boots: its console shows the tiny guest's marker
        for vm in view["vms"]:
            client = nodes[vm["node"]].client(timeout=60)
            assert vm["userid"] in client.call("guest_list")
            wait_until(
                lambda c=client, u=vm["userid"]: guest.expected_marker
                in c.call("guest_console_output", u),
                timeout_s=BOOT_S, what=f"{vm['name']}'s boot marker", max_interval_s=0.3,
            )  # fmt: skip
            assert client.call("guest_power_state", vm["userid"]) == "on"
        boot_s = time.monotonic() - t0
        status, listed = volt.request("GET", "/v1/nodes")
        assert [(n["used"]["vcpus"], len(n["vms"])) for n in listed] == [(2, 2), (2, 2), (0, 0)]
        # full: a fifth VM is refused up front
        status, err = volt.request("POST", "/v1/clusters", {**burst, "count": 1})
        assert status == 409, err

        # per-VM actions on the real guests
        t_actions = time.monotonic()
        first, second = view["vms"][0], view["vms"][1]
        client = nodes[first["node"]].client(timeout=60)
        url = f"/v1/vms/{first['userid']}"
        assert volt.request("POST", f"{url}/action", {"action": "suspend"})[0] == 202
        wait_until(lambda: volt.request("GET", url)[1]["power"] == "paused",
                   timeout_s=30, what="the suspend", max_interval_s=0.1)  # fmt: skip
        assert client.call("guest_power_state", first["userid"]) == "paused"
        status, answer = volt.request(
            "POST", "/groupmanager?resumeVirtualMachine", raw=first["userid"].encode()
        )
        assert (status, answer) == (200, True), answer
        wait_until(lambda: volt.request("GET", url)[1]["power"] == "on",
                   timeout_s=30, what="the resume", max_interval_s=0.1)  # fmt: skip
        assert client.call("guest_power_state", first["userid"]) == "on"
        status, err = volt.request("POST", f"{url}/action", {"action": "hibernate"})
        assert status == 400 and "'action'" in err["errors"][0]["detail"], err
        url = f"/v1/vms/{second['userid']}"
        assert volt.request("POST", f"{url}/action", {"action": "destroy"})[0] == 202
        wait_until(lambda: volt.request("GET", url)[1]["status"] == "DELETED",
                   timeout_s=60, what="the per-VM destroy", max_interval_s=0.1)  # fmt: skip
        owner = nodes[second["node"]].client(timeout=60)
        assert second["userid"] not in owner.call("guest_list")
        actions_s = time.monotonic() - t_actions

        assert volt.request("DELETE", f"/v1/clusters/{task}")[0] == 202
        view = wait_until(
            lambda: (v := volt.request("GET", f"/v1/clusters/{task}")[1])["status"] != "DELETING"
            and v,
            timeout_s=60, what="the destroy", max_interval_s=0.2,
        )  # fmt: skip
        assert view["status"] == "DELETED", not_deleted(view)
        for name, node in nodes.items():
            client = node.client()
            assert client.call("guest_list") == []
            assert client.call("list") == []
            prefix = f"{LAB}{os.getpid()}{name}-"
            assert all(
                domain_gone(libvirt_daemons.uri, f"vmt-{prefix}{vm['userid']}")
                for vm in view["vms"]
            )
        print(
            f"\ncluster burst: 4 VMs on 2 nodes dispatched in {dispatch_s:.1f} s, all booted "
            f"in {boot_s:.1f} s (POST {post_s:.2f} s with a silent node); per-VM actions "
            f"{actions_s:.1f} s; whole test {time.monotonic() - started:.1f} s"
        )
    finally:
        silent.close()
        stop_all(volt, nodes)


def not_deleted(view: dict) -> str:
    """Each VM the destroy left, with its node and whole error: a string, since pytest cuts
    a non-string assertion message to 240 characters."""
    lines = [f"{vm['name']} ({vm['userid']}) on {vm['node']}: {vm['status']}: {vm['error']}"
             for vm in view["vms"] if vm["status"] != "DELETED"]  # fmt: skip
    return f"task {view['task']} is {view['status']}:\n" + "\n".join(lines)


def stop_all(volt: VoltProcess, nodes: dict[str, VirtmanProcess]) -> None:
    """volt-api, then each node with its guests deleted (best effort), if started."""
    if volt.proc is not None:
        volt.stop()
    for node in nodes.values():
        if node.proc is not None:
            delete_guests(node)
            node.stop()


def delete_guests(node: VirtmanProcess) -> None:
    """Best effort after a failure: no guest (domain, snapshot) outlives the test."""
    try:
        client = node.client(timeout=60)
        for userid in client.call("guest_list"):
            try:
                client.call("guest_action", userid, "stop")
            except Exception as exc:
                print(f"stop {userid}: {exc}")
            client.call("guest_delete", userid)
    except Exception as exc:
        print(f"guests of {node.workdir} not deleted: {exc}")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("{not json", "Expecting property name"),
        ('[{"id": "bad id", "url": "http://127.0.0.1:7774"}]', "node #0: id must be"),
    ],
)
def test_volt_api_refuses_a_bad_nodes_file(workdir: Path, content, message) -> None:
    nodes_file = workdir / "nodes.json"
    if content is not None:
        nodes_file.write_text(content)
    volt = VoltProcess(workdir, cluster__nodes_file=nodes_file)
    with pytest.raises(RuntimeError, match="volt-api exited 1") as err:
        volt.start()
    assert f"[cluster] nodes_file {nodes_file}" in str(err.value) and message in str(err.value)


def test_controller_tables_on_postgresql(postgres) -> None:
    """The same controller on a PostgreSQL store (fake nodes in-process): the tables are
    made by the store's schema code, a burst runs, a second store sees it, destroy works."""
    from tests.unit.volt.cluster_fakes import FakeNode, client_factory
    from volt.cluster.controller import Controller
    from volt.cluster.model import VMSpec
    from volt.store import Store

    fakes = {n.endpoint.id: n for n in (FakeNode("n1", 2, 1024), FakeNode("n2", 2, 1024))}
    store = Store(postgres.url)
    controller = Controller(
        store, [n.endpoint for n in fakes.values()], client_factory=client_factory(fakes)
    )
    try:
        controller.capacity.refresh_all()  # now: placement reads only what the cache holds
        task = controller.submit([VMSpec(f"pg-{i}", "tiny", 1, 128) for i in range(4)], "v1")
        vms = wait_until(
            lambda: (v := controller.vms(task)) and all(vm.status == "RUNNING" for vm in v) and v,
            timeout_s=20, what="the burst on PostgreSQL", max_interval_s=0.05,
        )  # fmt: skip
        assert Counter(vm.node for vm in vms) == {"n1": 2, "n2": 2}
        other = Store(postgres.url)  # another volt-api's view of the same store
        try:
            assert [vm.status for vm in Controller(other, []).vms(task)] == ["RUNNING"] * 4
        finally:
            other.dispose()
        controller.destroy(task)
        wait_until(
            lambda: all(vm.status == "DELETED" for vm in controller.vms(task)),
            timeout_s=20, what="the destroy", max_interval_s=0.05,
        )  # fmt: skip
        assert all(not n.guests for n in fakes.values())
    finally:
        controller.close()
        store.dispose()
