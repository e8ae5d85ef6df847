"""brick.lio without configfs: a stand-in for the part of rtslib-fb 2.1.75 that brick.lio uses
(same class names, constructor arguments and attributes), injected through ``rtslib=``."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from brick import lio as liom
from brick.exception import Conflict, InvalidArgument
from brick.lio import LioError, LioExport, LioTargets
from brick.tgt import Chap
from tests.unit.fakes.rtslib import fake_rtslib

IQN = "iqn.2010-10.org.openstack:volume-img"
ME = "iqn.2024-01.ci.initiator:node1"
OTHER = "iqn.2024-01.ci.initiator:node2"
DEV = "/dev/mapper/relay_volume-img"
CHAP = Chap("vmt.relay", "s3cret-Relay-pw!")


@pytest.fixture
def rts(tmp_path: Path) -> Any:
    return fake_rtslib(tmp_path)


def test_the_module_imports_and_constructs_without_rtslib() -> None:
    LioTargets()
    assert "rtslib_fb" not in sys.modules


def test_storage_object_names_are_ours_readable_and_stable() -> None:
    name = liom.storage_object_name(IQN)
    assert name == liom.storage_object_name(IQN)
    assert name.startswith("vmt-volume-img-") and len(name) == len("vmt-volume-img-") + 8
    assert liom.storage_object_name("iqn.2024-01.org.example").startswith("vmt-")


def test_export_with_acls_builds_a_read_only_chap_target_enabled_last(rts: Any) -> None:
    export = LioTargets(rtslib=rts).export(
        IQN, DEV, chap=CHAP, initiators=[ME, OTHER], portals=["10.0.0.2:3260", "[fd00::2]:3260"]
    )
    assert export == LioExport(
        iqn=IQN,
        device=DEV,
        lun=1,
        portals=("10.0.0.2:3260", "[fd00::2]:3260"),
        initiators=(ME, OTHER),
        chap_user="vmt.relay",
        storage_object=liom.storage_object_name(IQN),
    )
    (so,) = rts.state["sos"]
    assert so.readonly and so.udev_path == DEV
    (target,) = rts.state["targets"]
    (tpg,) = target.tpgs
    assert tpg.tag == 1 and tpg.enable
    assert tpg.attributes == {"authentication": "1", "generate_node_acls": "0"}
    assert [(np.ip_address, np.port) for np in tpg.network_portals] == [
        ("10.0.0.2", 3260),
        ("[fd00::2]", 3260),  # rtslib wants the brackets
    ]
    assert [(a.node_wwn, a.chap_userid, a.chap_password) for a in tpg.node_acls] == [
        (ME, "vmt.relay", "s3cret-Relay-pw!"),
        (OTHER, "vmt.relay", "s3cret-Relay-pw!"),
    ]
    assert all(
        (m.mapped_lun, m.write_protect, m.tpg_lun.lun) == (1, True, 1)
        for a in tpg.node_acls
        for m in a.mapped_luns
    )
    assert "s3cret" not in repr(export)


def test_demo_mode_with_chap(rts: Any) -> None:
    export = LioTargets(rtslib=rts).export(IQN, DEV, chap=CHAP, lun=0)
    assert export.initiators is None and export.lun == 0
    assert export.portals == ("0.0.0.0:3260",)
    (tpg,) = rts.state["targets"][0].tpgs
    assert tpg.attributes == {
        "authentication": "1",
        "generate_node_acls": "1",
        "cache_dynamic_acls": "1",
        "demo_mode_write_protect": "1",
    }
    assert (tpg.chap_userid, tpg.chap_password) == ("vmt.relay", "s3cret-Relay-pw!")
    assert tpg.node_acls == []


def test_export_is_idempotent_and_refuses_other_parameters(rts: Any) -> None:
    lio = LioTargets(rtslib=rts)
    first = lio.export(IQN, DEV, chap=CHAP, initiators=[ME])
    assert lio.export(IQN, DEV, chap=CHAP, initiators=[ME]) == first
    assert len(rts.state["targets"]) == 1 and len(rts.state["sos"]) == 1
    for kwargs, why in [
        ({"initiators": [OTHER]}, "initiators"),
        ({"initiators": None}, "initiators"),
        ({"initiators": [ME], "lun": 2}, "lun 1 != 2"),
        ({"initiators": [ME], "portals": ["10.0.0.2:3260"]}, "portals"),
        ({"initiators": [ME], "chap": Chap("vmt.relay", "another-password")}, "CHAP password"),
        ({"initiators": [ME], "chap": Chap("vmt.other", "s3cret-Relay-pw!")}, "chap_user"),
    ]:
        args = {"chap": CHAP, **kwargs}
        with pytest.raises(Conflict, match=why):
            lio.export(IQN, DEV, **args)  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="device '/dev/mapper/relay_volume-img' != '/dev/sdx'"):
        lio.export(IQN, "/dev/sdx", chap=CHAP, initiators=[ME])


def test_a_target_that_is_not_ours_is_left_alone(rts: Any) -> None:
    so = rts.BlockStorageObject("theirs", dev="/dev/sdq")
    tpg = rts.TPG(rts.Target(rts.FabricModule("iscsi"), IQN), 1)
    rts.LUN(tpg, 0, so)
    lio = LioTargets(rtslib=rts)
    assert lio.list() == [] and lio.get(IQN) is None
    with pytest.raises(Conflict, match="exists and is not ours"):
        lio.export(IQN, DEV, chap=CHAP)
    with pytest.raises(Conflict, match="is not ours: not removed"):
        lio.remove(IQN)
    assert lio.remove_all() == 0
    assert len(rts.state["targets"]) == 1 and len(rts.state["sos"]) == 1


def test_a_failed_export_leaves_nothing(tmp_path: Path) -> None:
    rts = fake_rtslib(tmp_path, bad_port=3261)
    lio = LioTargets(rtslib=rts)
    with pytest.raises(LioError) as err:
        lio.export(IQN, DEV, chap=CHAP, portals=["10.0.0.2:3260", "10.0.0.3:3261"])
    assert str(err.value) == (
        f"LIO: cannot export {DEV} as {IQN}: "
        "RTSLibError: Could not create NetworkPortal in configFS"
    )
    assert rts.state == {"targets": [], "sos": []}


def test_a_device_in_use_is_refused(tmp_path: Path) -> None:
    rts = fake_rtslib(tmp_path, busy=frozenset({"/dev/mapper/cached_volume-img"}))
    with pytest.raises(LioError, match="is already in use"):
        LioTargets(rtslib=rts).export(IQN, "/dev/mapper/cached_volume-img", chap=CHAP)
    assert rts.state == {"targets": [], "sos": []}


def test_list_get_sessions_remove(rts: Any, tmp_path: Path) -> None:
    lio = LioTargets(rtslib=rts)
    lio.export(IQN, DEV, chap=CHAP, initiators=[ME])
    lio.export("iqn.2010-10.org.openstack:volume-b", "/dev/mapper/relay_volume-b", chap=CHAP)
    assert [e.iqn for e in lio.list()] == ["iqn.2010-10.org.openstack:volume-b", IQN]
    assert lio.sessions(IQN) == ()
    rts.state["targets"][0].tpgs[0].node_acls[0].session = {"state": "LOGGED_IN"}
    assert lio.sessions(IQN) == (ME,)
    assert lio.get(IQN) is not None and lio.get(IQN).sessions == (ME,)  # type: ignore[union-attr]
    # demo mode: the TPG's dynamic_sessions file lists the initiators logged in
    (tmp_path / "tpgt_1").mkdir()
    # as read in a guest (kernel 6.1): the name, a newline, then a NUL
    (tmp_path / "tpgt_1" / "dynamic_sessions").write_text(f"{OTHER}\n\x00")
    assert lio.sessions("iqn.2010-10.org.openstack:volume-b") == (OTHER,)
    assert lio.sessions("iqn.2010-10.org.openstack:volume-c") == ()

    assert lio.remove(IQN) is True
    assert lio.remove(IQN) is False
    assert [so.udev_path for so in rts.state["sos"]] == ["/dev/mapper/relay_volume-b"]
    rts.BlockStorageObject("vmt-orphan", dev="/dev/sdr")  # left by a crash
    assert lio.remove_all() == 1
    assert rts.state == {"targets": [], "sos": []}


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("iqn.bad", DEV), {}, "invalid iqn 'iqn.bad'"),
        ((IQN, "/dev/sda;reboot"), {}, "invalid device '/dev/sda;reboot'"),
        ((IQN, "relative"), {}, "invalid device 'relative'"),
        ((IQN, "/dev/../etc/passwd"), {}, "invalid device"),
        ((IQN, DEV), {"chap": ("vmt.relay", "x")}, "invalid chap 'tuple': must be a Chap"),
        ((IQN, DEV), {"lun": 256}, "invalid lun 256"),
        ((IQN, DEV), {"portals": "0.0.0.0:3260"}, "invalid portals '0.0.0.0:3260'"),
        ((IQN, DEV), {"portals": ["0.0.0.0"]}, "invalid portal '0.0.0.0'"),
        ((IQN, DEV), {"initiators": []}, "invalid initiators []"),
        ((IQN, DEV), {"initiators": ["10.0.0.1"]}, "invalid initiators '10.0.0.1'"),
    ],
)
def test_export_validates_before_touching_configfs(
    rts: Any, args: tuple[str, str], kwargs: dict[str, object], message: str
) -> None:
    called = {"n": 0}

    def count() -> Any:
        called["n"] += 1
        return rts.RTSRoot()

    rts_counted = SimpleNamespace(**{**vars(rts), "RTSRoot": count})
    call_kwargs: dict[str, Any] = {"chap": CHAP, **kwargs}
    with pytest.raises(InvalidArgument) as err:
        LioTargets(rtslib=rts_counted).export(*args, **call_kwargs)
    assert message in str(err.value)
    assert called["n"] == 0 and rts.state == {"targets": [], "sos": []}


def test_prefix_rule() -> None:
    with pytest.raises(InvalidArgument, match="invalid prefix 'x'"):
        LioTargets(prefix="x")
    assert LioTargets(prefix="test-").prefix == "test-"
