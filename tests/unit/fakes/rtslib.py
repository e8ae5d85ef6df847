"""A stand-in for the part of rtslib-fb 2.1.75 that brick.lio uses (same class names,
constructor arguments and attributes): a configfs in memory, injected through ``rtslib=``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any


class RTSLibError(Exception):
    pass


def fake_rtslib(tmp_path: Path, *, busy: frozenset[str] = frozenset(), bad_port: int = 0) -> Any:
    """A configfs in memory. ``busy`` devices are refused like rtslib's is_dev_in_use does;
    a portal on ``bad_port`` fails (to test the undo)."""
    state: dict[str, Any] = {"targets": [], "sos": []}

    class Node:
        def delete(self) -> None:
            raise NotImplementedError

    class BlockStorageObject(Node):
        def __init__(self, name: str, dev: str | None = None, readonly: bool = False) -> None:
            if any(so.name == name for so in state["sos"]):
                raise RTSLibError(f"Storage object {name} exists")
            if dev in busy:
                raise RTSLibError(
                    f"Cannot configure StorageObject because device {dev} is already in use"
                )
            self.name, self.udev_path, self.readonly = name, dev, readonly
            state["sos"].append(self)

        @property
        def attached_luns(self) -> list[Any]:
            return [
                lun
                for t in state["targets"]
                for tpg in t.tpgs
                for lun in tpg.luns
                if lun.storage_object is self
            ]

        def delete(self) -> None:
            state["sos"].remove(self)

    class FabricModule:
        def __init__(self, name: str) -> None:
            self.name = name

    class Target(Node):
        def __init__(self, fabric: FabricModule, wwn: str, mode: str = "any") -> None:
            if any(t.wwn == wwn for t in state["targets"]):
                raise RTSLibError("This Target already exists in configFS")
            self.fabric_module, self.wwn, self.tpgs = fabric, wwn, []
            state["targets"].append(self)

        def delete(self) -> None:
            state["targets"].remove(self)

    class TPG(Node):
        def __init__(self, target: Target, tag: int, mode: str = "any") -> None:
            self.tag, self.luns, self.network_portals, self.node_acls = tag, [], [], []
            self.attributes: dict[str, str] = {}
            self.enable = False
            self.chap_userid = self.chap_password = ""
            self.path = str(tmp_path / f"tpgt_{tag}")
            target.tpgs.append(self)

        def set_attribute(self, name: str, value: str) -> None:
            self.attributes[name] = value

        def get_attribute(self, name: str) -> str:
            return self.attributes.get(name, "0")

    class LUN:
        def __init__(self, tpg: TPG, lun: int, storage_object: BlockStorageObject) -> None:
            self.lun, self.storage_object = lun, storage_object
            tpg.luns.append(self)

    class NetworkPortal:
        def __init__(self, tpg: TPG, ip_address: str, port: int, mode: str = "any") -> None:
            if port == bad_port:
                raise RTSLibError("Could not create NetworkPortal in configFS")
            self.ip_address, self.port = ip_address, port
            tpg.network_portals.append(self)

    class NodeACL:
        def __init__(self, tpg: TPG, node_wwn: str, mode: str = "any") -> None:
            self.node_wwn, self.mapped_luns, self.session = node_wwn, [], None
            self.chap_userid = self.chap_password = ""
            tpg.node_acls.append(self)

    class MappedLUN:
        def __init__(self, acl: NodeACL, mapped_lun: int, tpg_lun: LUN, write_protect: bool):
            self.mapped_lun, self.tpg_lun, self.write_protect = mapped_lun, tpg_lun, write_protect
            acl.mapped_luns.append(self)

    class RTSRoot:
        @property
        def targets(self) -> list[Any]:
            return list(state["targets"])

        @property
        def storage_objects(self) -> list[Any]:
            return list(state["sos"])

    return SimpleNamespace(
        BlockStorageObject=BlockStorageObject,
        FabricModule=FabricModule,
        Target=Target,
        TPG=TPG,
        LUN=LUN,
        NetworkPortal=NetworkPortal,
        NodeACL=NodeACL,
        MappedLUN=MappedLUN,
        RTSRoot=RTSRoot,
        RTSLibError=RTSLibError,
        state=state,
    )
