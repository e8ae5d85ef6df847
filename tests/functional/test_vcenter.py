"""Guests on vSphere (virtman.guest.vcenter) against govmomi's simulator, really running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from oslo_vmware import exceptions as vexc

from tests.functional.vcsimproc import VCSim
from tests.functional.voltproc import free_port
from virtman.errors import InstanceExists, InstanceNotFound
from virtman.guest.domains import InvalidVMInput
from virtman.guest.vcenter import (
    VCenterLoginFailed,
    VCenterMachines,
    VCenterSettings,
    VCenterTaskFailed,
    VCenterUnreachable,
)


@pytest.fixture(scope="module")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VCSim]:
    sim = VCSim(tmp_path_factory.mktemp("vcsim")).start()
    try:
        yield sim
    finally:
        sim.stop()
    assert not sim.pidfile.exists()


def settings(sim: VCSim, **changes: object) -> VCenterSettings:
    values: dict[str, object] = dict(
        host=sim.host, port=sim.port, scheme="http", username=sim.username,
        password=sim.password, generate_wsdl=True, task_poll_interval=0.05,
    )  # fmt: skip
    values.update(changes)
    return VCenterSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def machines(vcsim: VCSim, tmp_path: Path) -> Iterator[VCenterMachines]:
    with VCenterMachines(settings(vcsim), state_dir=tmp_path) as vms:
        yield vms
        for info in vms.list():  # cleanup always runs
            vms.destroy(info.instance)


def all_vm_names(vms: VCenterMachines) -> list[str]:
    return sorted(vms._prop(vm, "name") for vm in vms._all_vms(vms._inv().vm_folder))


def test_lifecycle_of_three_guests(machines: VCenterMachines, vcsim: VCSim, tmp_path: Path) -> None:
    foreign = all_vm_names(machines)
    assert foreign and not machines.list()  # the simulator's own VMs are not ours

    booted = [machines.boot(f"g{i}", vcpus=1, memory_mb=64) for i in range(3)]
    assert [i.domain for i in booted] == ["vmt-g0", "vmt-g1", "vmt-g2"]
    assert all(i.state == "running" for i in booted)
    assert len({i.uuid for i in booted}) == 3
    assert [i.instance for i in machines.list()] == ["g0", "g1", "g2"]
    with pytest.raises(InstanceExists):
        machines.boot("g1")

    for info in booted:
        assert machines.find_by_uuid(info.uuid) == info
        assert machines.info(info.instance) == info
    with pytest.raises(InstanceNotFound):
        machines.find_by_uuid("00000000-0000-0000-0000-000000000000")

    assert machines.stop("g0") is True
    assert machines.info("g0").state == "shutoff"
    machines.start("g0")
    assert machines.info("g0").state == "running"
    assert [i.instance for i in machines.orphans(["g0", "g2"])] == ["g1"]
    with VCenterMachines(settings(vcsim), state_dir=tmp_path) as restarted:  # a new session
        assert restarted.list() == machines.list()
    gone = machines._owned("g2")
    assert gone is not None

    for info in booted:
        machines.destroy(info.instance)
    machines.destroy("g0")  # gone already: success
    assert machines._describe(gone[0]) is None  # a vanished VM is no error, and not ours
    assert machines.list() == []
    assert all_vm_names(machines) == foreign  # nothing of ours left, nothing else touched
    with pytest.raises(InstanceNotFound):
        machines.info("g0")


def test_vms_go_to_the_cluster_with_a_scsi_controller_for_their_rdm(
    machines: VCenterMachines,
) -> None:
    """The simulator's cluster (3 hosts, not the standalone one) takes the VMs; each has the
    controller its RDM disk goes on; reset and suspend act on it."""
    hosts = machines.hosts()
    assert [h.name for h in hosts] == ["DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2"]
    assert all(h.connected and h.cpu_threads > 0 and h.memory_mb > 0 for h in hosts)
    on = {machines.host_of(machines.boot(f"h{i}", memory_mb=64).instance) for i in range(4)}
    assert on <= {h.name for h in hosts}

    change = machines.rdm_change("h0", "/vmfs/devices/disks/naa.6000")
    vm, _ = machines._owned("h0") or (None, None)
    devices = machines._prop(vm, "config.hardware.device").VirtualDevice
    (controller,) = [d for d in devices if type(d).__name__ == "ParaVirtualSCSIController"]
    assert change.device.controllerKey == controller.key
    assert change.device.backing.deviceName == "/vmfs/devices/disks/naa.6000"
    assert change.device.backing.fileName == "[LocalDS_0] vmt-h0/vmt-h0-rdm.vmdk"

    machines.suspend("h0")
    assert machines.info("h0").state == "paused"
    machines.start("h0")  # resumes
    assert machines.info("h0").state == "running"
    machines.reset("h0")
    assert machines.info("h0").state == "running"


def test_wrong_password_is_named(vcsim: VCSim, tmp_path: Path) -> None:
    with pytest.raises(VCenterLoginFailed) as err:
        VCenterMachines(settings(vcsim, password="wrong"), state_dir=tmp_path)
    assert str(err.value) == (
        f"vCenter at http://127.0.0.1:{vcsim.port} refused the login of 'vmt-admin'"
    )


def test_unknown_datastore_is_named(vcsim: VCSim, tmp_path: Path) -> None:
    with pytest.raises(InvalidVMInput) as err:
        VCenterMachines(settings(vcsim, datastore="nope"), state_dir=tmp_path)
    assert str(err.value) == "invalid vcenter.datastore 'nope': not in ['LocalDS_0']"


def test_unreachable_vcenter_is_named(vcsim: VCSim, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(VCenterUnreachable) as err:
        VCenterMachines(settings(vcsim, port=port, api_retry_count=0), state_dir=tmp_path)
    assert str(err.value).startswith(f"vCenter at http://127.0.0.1:{port} unreachable: ")


def test_failed_create_task_leaves_nothing(machines: VCenterMachines) -> None:
    """govmomi 0.24's simulator has no fault injection; a real task fault is a stale file in
    the datastore where the new VM's .vmx goes (CreateVM_Task: FileAlreadyExists)."""
    inv = machines._inv()
    datastore = machines._prop(inv.datacenter, "datastore").ManagedObjectReference[0]
    stale = Path(machines._prop(datastore, "summary.url")) / "vmt-stale" / "vmt-stale.vmx"
    stale.parent.mkdir()
    stale.write_text("left by a VM vCenter forgot\n")
    try:
        before = all_vm_names(machines)
        with pytest.raises(VCenterTaskFailed) as err:
            machines.boot("stale")
        # the simulator's localizedMessage is the Go type; oslo.vmware translated the fault
        assert (
            str(err.value) == "vCenter CreateVM_Task for vmt-stale failed: *types.FileAlreadyExists"
        )
        assert isinstance(err.value.__cause__, vexc.FileAlreadyExistsException)
        assert machines.list() == []
        assert all_vm_names(machines) == before
        assert stale.read_text() == "left by a VM vCenter forgot\n"  # not ours: untouched
    finally:
        stale.unlink()
        stale.parent.rmdir()


def test_vcenter_gone_mid_use_is_named(tmp_path: Path) -> None:
    """The simulator killed under an open session: the next call fails at once, naming it."""
    sim = VCSim(tmp_path / "sim")
    sim.workdir.mkdir()
    sim.start()
    try:
        vms = VCenterMachines(settings(sim, api_retry_count=0), state_dir=tmp_path)
        assert vms.boot("g9").state == "running"
    finally:
        sim.stop()
    with pytest.raises(VCenterUnreachable) as err:
        vms.boot("g10")
    assert str(err.value).startswith(
        f"vCenter at http://127.0.0.1:{sim.port} unreachable: reading childEntity: "
    )
    vms.close()  # no vCenter to log out of: still no error
