"""Cluster tasks and their VMs in Volt's store, and the VM state machine.

A VM goes PENDING -> CREATING -> DEPLOYING -> STARTING -> RUNNING; any step may fail to
ERROR, and a VM whose node failed goes back to PENDING once (on another node). A finished VM
(RUNNING or ERROR) is destroyed through DELETING -> DELETED. A RUNNING VM's power
("on", "off", "paused") follows the per-VM actions without leaving RUNNING.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from volt.errors import Conflict, VoltError
from volt.store import Store, cluster_tasks, cluster_vms

PENDING, CREATING, DEPLOYING, STARTING = "PENDING", "CREATING", "DEPLOYING", "STARTING"
RUNNING, ERROR, DELETING, DELETED = "RUNNING", "ERROR", "DELETING", "DELETED"

TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({CREATING, ERROR}),
    CREATING: frozenset({DEPLOYING, PENDING, ERROR}),
    DEPLOYING: frozenset({STARTING, PENDING, ERROR}),
    STARTING: frozenset({RUNNING, PENDING, ERROR}),
    RUNNING: frozenset({DELETING}),
    ERROR: frozenset({DELETING}),
    DELETING: frozenset({DELETED, ERROR}),
    DELETED: frozenset(),
}
FINISHED = frozenset({RUNNING, ERROR, DELETED})
# VMs that hold capacity on their node (a DELETED or never-placed one does not)
HOLDS_ROOM = frozenset({PENDING, CREATING, DEPLOYING, STARTING, RUNNING, ERROR, DELETING})


class TaskNotFound(VoltError):
    status = 404
    code = "volt.cluster.task_not_found"
    title = "Not Found"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no cluster task {task_id!r}")


class VMNotFound(VoltError):
    status = 404
    code = "volt.cluster.vm_not_found"
    title = "Not Found"

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"no cluster VM {vm_id!r}")


class BadTransition(Exception):
    """A programming error: a VM asked to go where the state machine does not allow."""


def check_transition(old: str, new: str) -> None:
    if new not in TRANSITIONS[old]:
        raise BadTransition(f"{old} -> {new}")


@dataclass(frozen=True)
class VMSpec:
    name: str
    image: str
    vcpus: int
    memory_mb: int
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class VM:
    task_id: str
    idx: int
    name: str
    userid: str
    image: str
    vcpus: int
    memory_mb: int
    node: str | None
    status: str
    address: str | None
    error: str | None
    attempts: int
    extra: dict[str, Any] | None

    @property
    def power(self) -> str | None:
        """The guest's power as the last per-VM action left it (None unless RUNNING)."""
        if self.status != RUNNING:
            return None
        return str((self.extra or {}).get("power", "on"))

    def view(self) -> dict[str, Any]:
        return {
            "task": self.task_id,
            "index": self.idx,
            "name": self.name,
            "userid": self.userid,
            "image": self.image,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "node": self.node,
            "status": self.status,
            "power": self.power,
            "address": self.address,
            "error": self.error,
            "attempts": self.attempts,
            "migration": (self.extra or {}).get("migration"),
        }


def task_status(vms: list[VM]) -> str:
    states = {vm.status for vm in vms}
    if states == {DELETED}:
        return "DELETED"
    if states & {DELETING}:
        return "DELETING"
    if not states <= FINISHED:
        return "IN_PROGRESS"
    return "FAILED" if ERROR in states else "DONE"


def _vm(row: Any) -> VM:
    return VM(
        task_id=row.task_id,
        idx=row.idx,
        name=row.name,
        userid=row.userid,
        image=row.image,
        vcpus=row.vcpus,
        memory_mb=row.memory_mb,
        node=row.node,
        status=row.status,
        address=row.address,
        error=row.error,
        attempts=row.attempts,
        extra=json.loads(row.extra) if row.extra else None,
    )


class Records:
    """The controller's rows; every change is committed before it returns and names
    ``owner`` (the controller making it) as the row's owner."""

    def __init__(self, store: Store, owner: str | None = None) -> None:
        self.engine = store.engine
        self.owner = owner

    def create(
        self, task_id: str, origin: str, specs: list[VMSpec], nodes: list[str], userids: list[str]
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                cluster_tasks.insert().values(id=task_id, created_at=time.time(), origin=origin)
            )
            conn.execute(
                cluster_vms.insert(),
                [
                    {
                        "task_id": task_id,
                        "idx": i,
                        "name": spec.name,
                        "userid": userid,
                        "image": spec.image,
                        "vcpus": spec.vcpus,
                        "memory_mb": spec.memory_mb,
                        "node": node,
                        "status": PENDING,
                        "attempts": 0,
                        "extra": json.dumps(spec.extra) if spec.extra else None,
                        "owner": self.owner,
                    }
                    for i, (spec, node, userid) in enumerate(
                        zip(specs, nodes, userids, strict=True)
                    )
                ],
            )

    def vms(self, task_id: str) -> list[VM]:
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(cluster_tasks.c.id).where(cluster_tasks.c.id == task_id)
            ).first()
            if found is None:
                raise TaskNotFound(task_id)
            rows = conn.execute(
                sa.select(cluster_vms)
                .where(cluster_vms.c.task_id == task_id)
                .order_by(cluster_vms.c.idx)
            )
            return [_vm(r) for r in rows]

    def task_origin(self, task_id: str) -> str:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(cluster_tasks.c.origin).where(cluster_tasks.c.id == task_id)
            ).first()
        if row is None:
            raise TaskNotFound(task_id)
        return str(row.origin)

    def task_times(self) -> dict[str, float]:
        """Every task's creation time (epoch seconds)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(cluster_tasks.c.id, cluster_tasks.c.created_at))
            return {r.id: float(r.created_at) for r in rows}

    def all_vms(self) -> list[VM]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(cluster_vms).order_by(cluster_vms.c.task_id))
            return [_vm(r) for r in rows]

    def vm(self, userid: str) -> VM:
        """The VM of a userid; VMNotFound otherwise."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(cluster_vms).where(cluster_vms.c.userid == userid)).first()
        if row is None:
            raise VMNotFound(userid)
        return _vm(row)

    def unfinished(self, owner: str | None) -> list[VM]:
        """The VMs that may be in the middle of a step: bring-up, destroy, or (RUNNING) a
        migration; of ``owner`` only unless it is None. Of the RUNNING ones only those with
        a migration on record are read (a match on the key in their JSON: a cluster's
        running VMs would otherwise all be loaded at every start); the caller decides with
        ``migration.migrating`` whether it is still under way."""
        stepping = [PENDING, CREATING, DEPLOYING, STARTING, DELETING]
        migrated = sa.and_(
            cluster_vms.c.status == RUNNING, cluster_vms.c.extra.like('%"migration"%')
        )
        query = sa.select(cluster_vms).where(sa.or_(cluster_vms.c.status.in_(stepping), migrated))
        if owner is not None:
            query = query.where(cluster_vms.c.owner == owner)
        with self.engine.connect() as conn:
            return [_vm(r) for r in conn.execute(query.order_by(cluster_vms.c.task_id))]

    def live_named(self, name: str) -> list[VM]:
        """The VMs not DELETED whose name or userid is ``name`` (names repeat across tasks)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(cluster_vms)
                .where(sa.or_(cluster_vms.c.name == name, cluster_vms.c.userid == name))
                .where(cluster_vms.c.status != DELETED)
                .order_by(cluster_vms.c.task_id, cluster_vms.c.idx)
            )
            return [_vm(r) for r in rows]

    def note(self, vm: VM, **values: Any) -> VM:
        """Change ``values`` of ``vm`` while its status stays what it was."""
        return self._write(vm, values)

    def userids(self) -> set[str]:
        with self.engine.connect() as conn:
            return {r.userid for r in conn.execute(sa.select(cluster_vms.c.userid))}

    def update(self, vm: VM, status: str, **values: Any) -> VM:
        """Move ``vm`` to ``status`` (checked against the state machine) with ``values``."""
        check_transition(vm.status, status)
        return self._write(vm, {"status": status, **values})

    def _write(self, vm: VM, values: dict[str, Any]) -> VM:
        """Write ``values`` (``extra`` as JSON) to ``vm``'s row if its status is still
        ``vm.status``: ``Conflict`` if another writer moved it meanwhile."""
        columns = {k: json.dumps(v) if k == "extra" else v for k, v in values.items()}
        if self.owner is not None:
            columns["owner"] = self.owner
        with self.engine.begin() as conn:
            done = conn.execute(
                cluster_vms.update()
                .where(cluster_vms.c.task_id == vm.task_id)
                .where(cluster_vms.c.idx == vm.idx)
                .where(cluster_vms.c.status == vm.status)
                .values(**columns)
            )
            if done.rowcount != 1:
                raise Conflict(f"VM {vm.name} of task {vm.task_id} changed meanwhile")
        return VM(**{**vm.__dict__, **values})
