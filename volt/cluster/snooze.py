"""Snooze's group manager and bootstrap bodies (seed 003) mapped onto the controller.

* ``POST /groupmanager?startVirtualCluster``: ``{"virtualMachineTemplates": [...]}``; each
  template gives ``vcpus``, ``memory`` (KiB, as libvirt's ``<memory>``), ``imageId`` and
  ``name``, or a ``libVirtTemplate`` they are read from (``<name>``, ``<vcpu>``,
  ``<memory>``, and the image: the first disk's source file name without its extension).
  Explicit keys win over the XML. The answer is the task id as plain text.
* ``POST /groupmanager?getVirtualClusterResponse``: the body is the task id (raw, or a JSON
  string); the answer is empty until every VM is RUNNING or ERROR, then the seed's shape.
* ``GET /bootstrap?getLocalControllerList``: one local controller per configured node.
* ``POST /groupmanager?{shutdown,destroy,suspend,resume,reboot}VirtualMachine``: the body
  is the VM's id (its name or userid; raw or a JSON string) or a VirtualMachineLocation
  (``virtualMachineId``, optional ``localControllerId``); the answer is ``true`` once the
  action is dispatched (the same per-VM actions as ``POST /v1/vms/{vm_id}/action``).
* ``POST /groupmanager?migrateVirtualMachine``: ``{"sourceVirtualMachineLocation",
  "destinationVirtualMachineLocation", "destinationHypervisorSettings", "migrated": false}``;
  the VM is the source location's, the destination node its ``localControllerId`` (the seed's
  libcloud passes another VM's location: that VM's node); the answer is ``true`` once the
  migration is dispatched (``POST /v1/vms/{vm_id}/migrate``).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from pathlib import PurePosixPath
from typing import Any
from xml.etree import ElementTree

from volt.cluster import model
from volt.cluster.model import VM, VMNotFound, VMSpec
from volt.errors import Conflict, InvalidInput

TEMPLATE_KEYS = {"libVirtTemplate", "networkCapacityDemand", "vcpus", "memory", "imageId", "name"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
USERID_RE = re.compile(r"[A-Z0-9]{1,8}")
VM_VERBS = {
    f"{action}VirtualMachine": action
    for action in ("shutdown", "destroy", "suspend", "resume", "reboot")
}
MAX_VMS = 256
LIBVIRT_TCP_PORT = 16509
MAX_VCPUS = 256
MAX_MEMORY_KIB = 1 << 40


def _positive(value: Any, field: str, limit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limit:
        raise InvalidInput(field, f"must be a number in (0, {limit:g}]")
    return float(value)


def _from_xml(text: Any, field: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise InvalidInput(field, "must be a libvirt domain XML string")
    if "<!" in text.replace("<![CDATA[", ""):  # DOCTYPE / ENTITY: no entity expansion
        raise InvalidInput(field, "must not declare a DOCTYPE or entities")
    try:
        root = ElementTree.fromstring(text.encode())  # noqa: S314 (no DTD: checked above)
    except ElementTree.ParseError as exc:
        raise InvalidInput(field, f"is not well-formed XML: {exc}") from None
    if root.tag != "domain":
        raise InvalidInput(field, "must be a <domain> document")
    found: dict[str, Any] = {}
    name = root.findtext("name")
    if name:
        found["name"] = name.strip()
    for key, tag in (("vcpus", "vcpu"), ("memory", "memory")):
        value = root.findtext(tag)
        if value is not None:
            try:
                found[key] = float(value.strip())
            except ValueError:
                raise InvalidInput(field, f"<{tag}> is not a number") from None
    source = root.find("./devices/disk/source")
    if source is not None and source.get("file"):
        found["imageId"] = PurePosixPath(source.get("file", "")).name.split(".")[0]
    return found


def start_request(body: Any) -> list[VMSpec]:
    """The VMs of a startVirtualCluster body; InvalidInput naming the field otherwise."""
    if not isinstance(body, dict) or set(body) != {"virtualMachineTemplates"}:
        raise InvalidInput("body", "must be an object with only virtualMachineTemplates")
    templates = body["virtualMachineTemplates"]
    if not isinstance(templates, list) or not 1 <= len(templates) <= MAX_VMS:
        raise InvalidInput("virtualMachineTemplates", f"must be a list of 1-{MAX_VMS} templates")
    specs, names = [], set()
    for i, template in enumerate(templates):
        where = f"virtualMachineTemplates[{i}]"
        if not isinstance(template, dict):
            raise InvalidInput(where, "must be an object")
        unknown = sorted(set(template) - TEMPLATE_KEYS)
        if unknown:
            raise InvalidInput(where, f"unknown keys {unknown}")
        values: dict[str, Any] = {}
        if "libVirtTemplate" in template:
            values.update(_from_xml(template["libVirtTemplate"], f"{where}.libVirtTemplate"))
        values.update(
            {k: v for k, v in template.items() if k in {"vcpus", "memory", "imageId", "name"}}
        )
        missing = sorted({"vcpus", "memory", "imageId", "name"} - set(values))
        if missing:
            raise InvalidInput(where, f"needs {missing} (or a libVirtTemplate that has them)")
        vcpus = _positive(values["vcpus"], f"{where}.vcpus", MAX_VCPUS)
        memory = _positive(values["memory"], f"{where}.memory", MAX_MEMORY_KIB)
        name, image = values["name"], values["imageId"]
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InvalidInput(f"{where}.name", "must be 1-64 of A-Z a-z 0-9 . _ -")
        if name in names:
            raise InvalidInput(f"{where}.name", f"{name!r} is used twice")
        names.add(name)
        if not isinstance(image, str) or not IMAGE_RE.fullmatch(image):
            raise InvalidInput(f"{where}.imageId", "must be 1-255 of A-Z a-z 0-9 . _ -")
        demand = template.get("networkCapacityDemand") or {}
        if not isinstance(demand, dict) or set(demand) - {"rxBytes", "txBytes"}:
            raise InvalidInput(f"{where}.networkCapacityDemand", "must be {rxBytes, txBytes}")
        network = [float(_positive(demand.get(k, 1), f"{where}.networkCapacityDemand.{k}", 1e15))
                   for k in ("rxBytes", "txBytes")]  # fmt: skip
        specs.append(
            VMSpec(
                name=name,
                image=image,
                vcpus=math.ceil(vcpus),
                memory_mb=math.ceil(memory / 1024),
                extra={
                    "memory_kib": memory,
                    "network": network if demand else [0.0, 0.0],
                    "xml": template.get("libVirtTemplate"),
                },
            )
        )
    return specs


def task_id(raw: bytes) -> str:
    """The task id of a getVirtualClusterResponse body: raw text or a JSON string."""
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith('"'):
        try:
            text = json.loads(text)
        except ValueError:
            raise InvalidInput("body", "is neither a task id nor a JSON string") from None
    try:
        return str(uuid.UUID(str(text)))
    except ValueError:
        raise InvalidInput("body", "must be a task identifier (a UUID)") from None


def vm_reference(body: Any) -> tuple[str, str | None]:
    """(VM name or userid, node id or None) of a per-VM verb's body."""
    node = None
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace").strip()
    if isinstance(body, dict):
        unknown = sorted(set(body) - LOCATION_KEYS)
        if unknown or "virtualMachineId" not in body:
            raise InvalidInput("body", "must be a VM id or a VirtualMachineLocation")
        node = body.get("localControllerId")
        if node is not None and not isinstance(node, str):
            raise InvalidInput("localControllerId", "must be a string")
        body = body["virtualMachineId"]
    if not isinstance(body, str) or not NAME_RE.fullmatch(body):
        raise InvalidInput("virtualMachineId", "must be 1-64 of A-Z a-z 0-9 . _ -")
    return body, node


MIGRATE_KEYS = {
    "sourceVirtualMachineLocation", "destinationVirtualMachineLocation",
    "destinationHypervisorSettings", "migrated",
}  # fmt: skip


def migrate_request(body: Any) -> tuple[str, str | None, Any]:
    """(VM name or userid, its node or None, destination node id) of a migrateVirtualMachine
    body; the destination is checked by the controller."""
    if not isinstance(body, dict) or not {
        "sourceVirtualMachineLocation", "destinationVirtualMachineLocation"
    } <= set(body) <= MIGRATE_KEYS:  # fmt: skip
        raise InvalidInput("body", f"must be an object with {sorted(MIGRATE_KEYS)}")
    if body.get("migrated", False) is not False:
        raise InvalidInput("migrated", "must be false (the migration has not happened yet)")
    source = body["sourceVirtualMachineLocation"]
    if not isinstance(source, dict):
        raise InvalidInput("sourceVirtualMachineLocation", "must be a VirtualMachineLocation")
    name, node = vm_reference(source)
    target = body["destinationVirtualMachineLocation"]
    if not isinstance(target, dict) or "localControllerId" not in target:
        raise InvalidInput(
            "destinationVirtualMachineLocation.localControllerId",
            "is required: the destination node",
        )
    return name, node, target["localControllerId"]


def pick(found: list[VM], name: str, node: str | None) -> VM:
    """The one VM a Snooze reference means; 404 for none, 409 when ambiguous."""
    found = [vm for vm in found if node is None or vm.node == node]
    if not found:
        raise VMNotFound(name if node is None else f"{name} on {node}")
    if len(found) > 1:
        raise Conflict(
            f"{len(found)} VMs are named {name!r} (userids {[vm.userid for vm in found]}); "
            "send the userid or a localControllerId"
        )
    return found[0]


LOCATION_KEYS = {
    "virtualMachineId", "localControllerId", "groupManagerId",
    "groupManagerControlDataAddress", "localControllerControlDataAddress",
}  # fmt: skip


def _address(address: tuple[str, int]) -> dict[str, Any]:
    return {"address": address[0], "port": address[1]}


def cluster_response(
    vms: list[VM], controller_id: str, controller: tuple[str, int], nodes: dict[str, Any]
) -> dict[str, Any] | None:
    """The seed's response shape, or None while a VM is still on its way."""
    if any(vm.status not in model.FINISHED for vm in vms):
        return None
    meta = []
    for vm in vms:
        extra = vm.extra or {}
        node = nodes.get(vm.node or "")
        node_address = node.address if node is not None else ("", 0)
        status = {model.RUNNING: "RUNNING", model.DELETED: "TERMINATED"}.get(vm.status, "ERROR")
        status = {"paused": "PAUSED", "off": "SHUTOFF"}.get(vm.power or "", status)
        meta.append(
            {
                "status": status,
                "virtualMachineLocation": {
                    "virtualMachineId": vm.name,
                    "localControllerId": vm.node,
                    "groupManagerId": controller_id,
                    "groupManagerControlDataAddress": _address(controller),
                    "localControllerControlDataAddress": _address(node_address),
                },
                "usedCapacity": {},
                "requestedCapacity": [
                    float(vm.vcpus),
                    float(extra.get("memory_kib", vm.memory_mb * 1024)),
                    *extra.get("network", [0.0, 0.0]),
                ],
                "ipAddress": vm.address,
                "errorCode": "UNKNOWN" if vm.status != model.ERROR else "FAILED",
                "errorMessage": vm.error,
                "groupManagerControlDataAddress": _address(controller),
                "xmlRepresentation": extra.get("xml"),
            }
        )
    failed = any(vm.status == model.ERROR for vm in vms)
    return {"errorCode": "FAILED" if failed else None, "virtualMachineMetaData": meta}


def local_controllers(states: list[dict[str, Any]], nodes: dict[str, Any]) -> dict[str, Any]:
    """The seed's getLocalControllerList shape from the controller's node states."""
    out = []
    for state in states:
        node = nodes[state["id"]]
        cap = state["capacity"] or {"vcpus": 0, "memory_mb": 0}
        out.append(
            {
                "id": state["id"],
                "controlDataAddress": _address(node.address),
                "status": "ACTIVE" if state["status"] == "up" else "PASSIVE",
                "hypervisorSettings": {
                    "port": LIBVIRT_TCP_PORT,  # not known to the controller: libvirt's default
                    "driver": "qemu",
                    "transport": "tcp",
                    "migration": {"method": "live", "timeout": 60},
                },
                "totalCapacity": [float(cap["vcpus"]), float(cap["memory_mb"] * 1024), 0.0, 0.0],
                "virtualMachineMetaData": {},
                "wakeupSettings": {"driver": "NONE", "options": ""},
                "hostname": (state["host"] or {}).get("hostname") or node.address[0],
                "assignedVirtualMachines": state["vms"],
            }
        )
    return {"localControllers": out}
