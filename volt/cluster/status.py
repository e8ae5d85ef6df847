"""The live status page's data: every image's tree, every node's VMs and cache, the tasks.

``GET /v1/status`` (admin credential) answers one JSON snapshot; the page (``static/``)
polls it. Volt's trees come from memory (or the store, on a shared store); node capacity
comes from the controller's capacity cache, which a background thread refreshes, so that a
poll never waits on a silent node (handlers run on volt-api's event loop). Bytes per source
are the nodes' own read counters, as their last heartbeat reported them (volt.traffic): per
node ``bytes_read`` (null: not reported) and ``bytes_served`` (what the nodes that reported
read from it), per image the totals read from the image server and from peers. Each VM's
last migration: the ones under way first, then the finished ones (moved bytes, or why not).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from volt import traffic, validation
from volt.cluster import migration, model
from volt.cluster.controller import Controller
from volt.errors import InvalidInput, VolumeNotFound
from volt.service import VoltService

LOG = logging.getLogger(__name__)
MAX_IMAGES = 50  # trees shown; the others are counted in "images_hidden"
MAX_TREE_NODES = 500  # nodes drawn per tree (breadth-first: the top of the tree)
MAX_TASKS = 20  # the most recent tasks that are not wholly DELETED
MAX_MIGRATIONS = 50  # the VMs' last migrations shown (those under way first)


def _tree(service: VoltService, volume_id: str) -> dict[str, Any] | None:
    try:
        entries = service.volume_nodes(volume_id)
    except VolumeNotFound:  # deleted since it was listed
        return None
    reads = {n.peer_id: service.traffic.of(n.peer_id) for n, _ in entries if n.peer_id}
    totals = {"image_server": 0, "peers": 0, "nodes_reporting": 0}
    served: dict[str, int] = {}  # per source peer: what the nodes that reported read from it
    for counts in reads.values():
        if counts is None:
            continue
        totals["nodes_reporting"] += 1
        for source, count in counts.items():
            totals["image_server" if source is None else "peers"] += count
            if source is not None:
                served[source] = served.get(source, 0) + count
    nodes = []
    for node, parents in entries[:MAX_TREE_NODES]:
        assert node.parent is not None
        nodes.append(
            {
                "peer_id": node.peer_id,
                "host": node.host,
                "member": node.member,
                "parent": node.parent.peer_id,  # None: the image server
                "depth": node.depth,
                "status": node.status,
                "parents": [p.peer_id for p in parents],
                "bytes_read": traffic.as_json(reads.get(node.peer_id or "")),
                "bytes_served": served.get(node.peer_id or "", 0),
            }
        )
    return {
        "id": volume_id,
        "count": len(entries),
        "depth": max((n.depth for n, _ in entries), default=0),
        "truncated": len(entries) > MAX_TREE_NODES,
        "nodes": nodes,
        "bytes_read": totals,
    }


def _cache_of(service: VoltService) -> dict[str, dict[str, Any]]:
    """Per Volt member host: its heartbeat age and the images it holds (its tree nodes)."""
    found: dict[str, dict[str, Any]] = {}
    for member in service.member_list():
        images = []
        for peer_id in member.peer_ids:
            try:
                images.append(validation.split_peer_id(peer_id)[1])
            except InvalidInput:
                continue
        found[member.host] = {
            "heartbeat_age_s": round(member.seconds_since_heartbeat, 1),
            "images": sorted(set(images)),
        }
    return found


def _nodes(
    states: list[dict[str, Any]],
    controller: Controller,
    cache: dict[str, dict[str, Any]],
    vms: list[model.VM],
) -> list[dict[str, Any]]:
    """The controller's nodes (with their VMs and the cache of the Volt member at their
    address), then the Volt members that are no controller node."""
    by_id = {s["id"]: s for s in states}
    out = []
    matched = set()
    for node_id, endpoint in controller.nodes.items():
        host = endpoint.address[0]
        state = by_id.get(node_id, {})
        member = cache.get(host)
        matched.add(host)
        out.append(
            {
                "id": node_id,
                "host": host,
                "status": state.get("status", "unknown"),
                "capacity": state.get("capacity"),
                "used": state.get("used"),
                "vms": [
                    {
                        "name": vm.name,
                        "status": vm.status,
                        "image": vm.image,
                        "migrating_to": migration.migration_of(vm)["to"]
                        if migration.migrating(vm)
                        else None,
                    }
                    for vm in vms
                    if vm.node == node_id and vm.status != model.DELETED
                ],
                "cache": member["images"] if member else [],
                "heartbeat_age_s": member["heartbeat_age_s"] if member else None,
            }
        )
    for host, member in sorted(cache.items()):
        if host in matched:
            continue
        out.append(
            {
                "id": host,
                "host": host,
                "status": "member",
                "capacity": None,
                "used": None,
                "vms": [],
                "cache": member["images"],
                "heartbeat_age_s": member["heartbeat_age_s"],
            }
        )
    return out


def _tasks(controller: Controller, vms: list[model.VM]) -> list[dict[str, Any]]:
    by_task: dict[str, list[model.VM]] = {}
    for vm in vms:
        by_task.setdefault(vm.task_id, []).append(vm)
    created = controller.records.task_times()
    live = [t for t, mine in by_task.items() if model.task_status(mine) != "DELETED"]
    live.sort(key=lambda t: created.get(t, 0.0), reverse=True)
    out = []
    for task_id in live[:MAX_TASKS]:
        mine = sorted(by_task[task_id], key=lambda vm: vm.idx)
        counts: dict[str, int] = {}
        for vm in mine:
            counts[vm.status] = counts.get(vm.status, 0) + 1
        out.append(
            {
                "task": task_id,
                "created_at": created.get(task_id),
                "status": model.task_status(mine),
                "counts": counts,
                "vms": [
                    {"name": vm.name, "node": vm.node, "status": vm.status, "error": vm.error}
                    for vm in mine
                ],
            }
        )
    return out


def _migrations(vms: list[model.VM]) -> list[dict[str, Any]]:
    out = []
    for vm in vms:
        moving = migration.migration_of(vm)
        if not moving or vm.status == model.DELETED:
            continue
        state = moving.get("state")
        out.append(
            {
                "vm": vm.name,
                "userid": vm.userid,
                "from": moving.get("from"),
                "to": moving.get("to"),
                "state": state,
                "disk_bytes": moving.get("disk_bytes"),
                "memory_bytes": moving.get("memory_bytes"),
                "seconds": moving.get("seconds"),
                "error": vm.error if state != migration.MIGRATING else None,
            }
        )
    out.sort(key=lambda m: m["state"] != migration.MIGRATING)
    return out[:MAX_MIGRATIONS]


def snapshot(service: VoltService, controller: Controller) -> dict[str, Any]:
    counts = service.volume_counts()
    images = [t for vid, _ in counts[:MAX_IMAGES] if (t := _tree(service, vid)) is not None]
    vms = controller.records.all_vms()
    return {
        "generated_at": time.time(),
        "executor": service.executor.name,
        "images": images,
        "images_hidden": max(0, len(counts) - MAX_IMAGES),
        "nodes": _nodes(controller.node_states(), controller, _cache_of(service), vms),
        "tasks": _tasks(controller, vms),
        "migrations": _migrations(vms),
    }
