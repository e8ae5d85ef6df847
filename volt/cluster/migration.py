"""Live migration of a cluster VM to another node, moving only what its guest wrote.

The destination first joins the image's tree: ``guest_migrate_prepare`` builds its own
stack for the image and a new, empty snapshot over it. Then the source's libvirt
live-migrates the guest with a non-shared *incremental* copy of the disk: only the clusters
the guest wrote (its overlay's allocation) cross, the image is read by the destination from
its own tree (``guest_migrate``, which answers the job's bytes). ``guest_migrate_finish``
records the guest as running on the destination. When the migration fails the guest keeps
running on the source and ``guest_migrate_abort`` removes the destination's snapshot.

While a VM migrates its record stays RUNNING with ``extra["migration"]["state"] ==
"migrating"``: it holds room on both nodes and takes no other action. A controller that
restarts in the middle asks both nodes where the guest is (``settled``) until it knows.
"""

from __future__ import annotations

from typing import Any

from volt.cluster import model
from volt.cluster.model import VM
from volt.cluster.nodes import NODE_ID_RE
from volt.errors import Conflict, InvalidInput

MIGRATING, DONE, FAILED = "migrating", "done", "failed"
GONE = "gone"  # what ``settled`` takes for a node that has no record of the guest
# What a source's guest_migrate answers (bytes unless named otherwise); kept on the VM.
STAT_KEYS = (
    "disk_bytes", "memory_bytes", "total_bytes", "disk_virtual_bytes", "disk_allocated_bytes",
    "guest_written_bytes", "seconds", "downtime_ms",
)  # fmt: skip


def migrating(vm: VM) -> bool:
    return bool(migration_of(vm).get("state") == MIGRATING)


def migration_of(vm: VM) -> dict[str, Any]:
    found = (vm.extra or {}).get("migration")
    return found if isinstance(found, dict) else {}


def destination_of(body: Any) -> Any:
    """The destination of a ``POST /v1/vms/{vm_id}/migrate`` body (checked by ``check``)."""
    if not isinstance(body, dict) or set(body) != {"destination"}:
        raise InvalidInput("body", 'must be {"destination": "<node id>"}')
    return body["destination"]


def check(vm: VM, destination: Any, states: list[dict[str, Any]]) -> str:
    """The destination node id if ``vm`` may move there now; ``InvalidInput`` naming
    ``destination`` (unknown, the VM's own node, down, not libvirt, no room) or ``Conflict``
    (the VM is not running, or migrating already). Reads only ``states`` (no node is asked)."""
    if not isinstance(destination, str) or not NODE_ID_RE.fullmatch(destination):
        raise InvalidInput("destination", "must be a node id (1-64 of A-Z a-z 0-9 . _ -)")
    by_id = {s["id"]: s for s in states}
    state = by_id.get(destination)
    if state is None:
        raise InvalidInput("destination", f"unknown node {destination!r}; known: {sorted(by_id)}")
    if destination == vm.node:
        raise InvalidInput("destination", f"VM {vm.userid} runs on {destination} already")
    if state["status"] != "up" or state["stale"]:
        why = "stale (its last answer is too old)" if state["status"] == "up" else state["status"]
        raise InvalidInput("destination", f"node {destination} is {why}: {state['error']}")
    if state["backend"] != "libvirt":
        raise InvalidInput(
            "destination", f"node {destination} runs {state['backend']} guests, not libvirt"
        )
    cap, used = state["capacity"], state["used"]
    free_vcpus, free_mb = cap["vcpus"] - used["vcpus"], cap["memory_mb"] - used["memory_mb"]
    if free_vcpus < vm.vcpus or free_mb < vm.memory_mb:
        raise InvalidInput(
            "destination",
            f"node {destination} has {free_vcpus} vcpus {free_mb} MB free; VM {vm.userid} "
            f"needs {vm.vcpus} vcpus {vm.memory_mb} MB",
        )
    if vm.status != model.RUNNING or migrating(vm):
        doing = "migrating" if migrating(vm) else vm.status
        raise Conflict(f"VM {vm.userid} is {doing}; a migration needs RUNNING")
    if vm.power != "on":
        raise Conflict(f"VM {vm.userid} is powered {vm.power}; a live migration needs it on")
    source = by_id.get(vm.node or "")
    if source is not None and source["backend"] not in (None, "libvirt"):
        raise Conflict(f"VM {vm.userid} runs on a {source['backend']} node: it cannot migrate")
    return destination


def settled(source_power: str, target_power: str) -> str | None:
    """Where an interrupted migration ended, from each node's ``guest_power_state`` (or
    ``GONE``): "moved" once the source released the guest (it does so only after libvirt
    moved it), "stayed" while the destination has no running domain for it (never started,
    or undone), None while both still hold it (libvirt's job may still run)."""
    if source_power == GONE:
        return "moved"
    if target_power in (GONE, "off"):
        return "stayed"
    return None


def stats_of(answer: Any) -> dict[str, Any]:
    """The byte counts of a source's ``guest_migrate`` answer (XML-RPC sends large integers
    as strings); missing ones are None."""
    found = answer if isinstance(answer, dict) else {}
    stats: dict[str, Any] = {}
    for key in STAT_KEYS:
        value = found.get(key)
        try:
            stats[key] = None if value is None else float(value) if key == "seconds" else int(value)
        except (TypeError, ValueError):
            stats[key] = None
    return stats
