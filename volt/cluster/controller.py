"""The controller: places a burst, dispatches it to the nodes, tracks and destroys it.

Dispatch is a bounded thread pool; each VM is brought up by one worker calling its node's
``guest_create`` -> ``guest_deploy`` -> ``guest_action start`` (XML-RPC, virtmanclient),
recording every step in the store. A VM whose node fails on the way is tried once more on
another node with room (its leftovers on the failed node are deleted, best effort). A
RUNNING VM moves to another node by live migration (``migrate``; volt.cluster.migration,
over XML-RPC only).

Every row names the controller that changed it last (``controller_id``). A controller that
starts takes up what it left unfinished when it stopped (``_resume``): a bring-up starts
again from a clean node, a destroy is sent again, a migration is settled by asking both
nodes. On a shared store (several volt-api, docs/ha.rst) each resumes only its own rows.

With a control bus (``bus``, volt/cluster/busdispatch.py) the same verbs go over it, in
their idempotent forms (``guest_create_once``, ``guest_deploy_once``: a verb whose answer
the bus lost is sent again over XML-RPC); the nodes' progress notifications and the
transport of every answered verb are the VM's events (volt/cluster/events.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import string
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from virtmanclient.exceptions import guest_not_found
from volt.cluster import migration, model
from volt.cluster.busdispatch import BusDispatch
from volt.cluster.capacity import CapacityCache
from volt.cluster.events import Events
from volt.cluster.model import VM, Records, VMSpec
from volt.cluster.nodes import INFO_TIMEOUT_S, NodeEndpoint
from volt.cluster.placement import Demand, InsufficientCapacity, Room, place
from volt.errors import Conflict, InvalidInput
from volt.store import Store

LOG = logging.getLogger(__name__)
CALL_TIMEOUT_S = 600.0  # a deploy builds a whole block stack
SETTLE_INTERVAL_S = 5.0  # how often a restarted controller asks where a migrating VM went
MAX_ATTEMPTS = 2  # the first node, then one other
USERID_CHARS = string.ascii_uppercase + string.digits
# Per-VM action -> the node's guest_action; destroy is apart.
POWER_ACTIONS = {
    "start": "start",
    "shutdown": "softstop",  # ACPI; powered off after the node's timeout
    "suspend": "pause",
    "resume": "unpause",
    "reboot": "reboot",
}
ACTIONS = frozenset({*POWER_ACTIONS, "destroy"})
BUS_HOST_RE = re.compile(r"[A-Za-z0-9.:-]{1,255}")  # a host_ip (IPv4, IPv6 or a name)

ClientFactory = Callable[[NodeEndpoint, float], Any]


def _default_client(node: NodeEndpoint, timeout: float) -> Any:
    return node.client(timeout)


def no_such_guest(exc: BaseException) -> bool:
    """The node's typed answer that it has no guest of that userid: fault 404 over XML-RPC,
    ``GuestNotFound`` over the bus (oslo.messaging's ``RemoteError.exc_type``)."""
    return guest_not_found(exc) or getattr(exc, "exc_type", None) == "GuestNotFound"


class Controller:
    def __init__(
        self,
        store: Store,
        nodes: Sequence[NodeEndpoint],
        *,
        workers: int = 8,
        client_factory: ClientFactory = _default_client,
        controller_address: tuple[str, int] = ("127.0.0.1", 0),
        capacity_interval: float = 5.0,
        capacity: CapacityCache | None = None,
        bus: BusDispatch | None = None,
    ) -> None:
        """``capacity``: a cache the caller refreshes (tests); default: one that asks
        every node every ``capacity_interval`` seconds in the background (over XML-RPC).
        ``bus``: dispatch the guest verbs over the control bus."""
        host, port = controller_address
        self.controller_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"volt:{host}:{port}"))
        self.records = Records(store, owner=self.controller_id)
        self.events = Events(store)
        self.bus = bus
        self.nodes = {n.id: n for n in nodes}
        self.client_factory = client_factory
        self.address = controller_address
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cluster")
        self._lock = threading.Lock()  # placement + recording: no two bursts take one room
        self._vm_locks: dict[str, threading.Lock] = {}  # per userid: its actions in turn
        self._closing = threading.Event()
        self.capacity = capacity or CapacityCache(nodes, self._ask, capacity_interval).start()
        # Found now, before any new burst is recorded (its rows would look unfinished too);
        # one volt-api alone owns every row, beside others its own only.
        self._resume(self.controller_id if store.shared else None)

    def close(self) -> None:
        self._closing.set()
        self.capacity.stop()
        self._pool.shutdown(wait=True)
        if self.bus is not None:
            self.bus.close()

    # -- capacity -------------------------------------------------------------------------------
    def _ask(self, node: NodeEndpoint) -> Any:
        return self.client_factory(node, INFO_TIMEOUT_S).call("guest_host_info")

    def node_states(self) -> list[dict[str, Any]]:
        """Per node, from the capacity cache (never asks a node): up, down or unknown,
        its backend (libvirt or vcenter), stale or not, capacity (host info capped by the
        nodes file), what the controller placed there, its VMs."""
        vms = [vm for vm in self.records.all_vms() if vm.status in model.HOLDS_ROOM]
        # a migrating VM holds room on its destination too
        arriving = {vm.userid: migration.migration_of(vm)["to"] for vm in vms
                    if migration.migrating(vm)}  # fmt: skip
        now = self.capacity.clock()
        states = []
        for node_id, node in self.nodes.items():
            probe = self.capacity.get(node_id)
            info = probe.info if probe is not None else None
            mine = [vm for vm in vms if node_id in (vm.node, arriving.get(vm.userid))]
            capacity = None
            if info is not None:
                vcpus, memory = int(info.get("vcpus", 0)), int(info.get("memory_mb", 0))
                capacity = {
                    "vcpus": min(vcpus, node.vcpus or vcpus),
                    "memory_mb": min(memory, node.memory_mb or memory),
                }
            states.append(
                {
                    "id": node_id,
                    "address": "{}:{}".format(*node.address),
                    "status": "unknown" if probe is None else "up" if info is not None else "down",
                    # what runs its guests: a node that does not say is a libvirt one
                    "backend": None if info is None else str(info.get("backend", "libvirt")),
                    "stale": probe is not None and self.capacity.stale(probe),
                    "checked_s_ago": None if probe is None else round(now - probe.at, 1),
                    "error": None if probe is None else probe.error,
                    "capacity": capacity,
                    "used": {
                        "vcpus": sum(vm.vcpus for vm in mine),
                        "memory_mb": sum(vm.memory_mb for vm in mine),
                    },
                    "host": None
                    if info is None
                    else {
                        "hostname": info.get("hypervisor_hostname"),
                        "vcpus_used": info.get("vcpus_used"),
                        "memory_mb_used": info.get("memory_mb_used"),
                    },
                    "vms": [vm.name for vm in mine],
                }
            )
        return states

    def _rooms(self, only: Sequence[str] | None = None) -> list[Room]:
        rooms = []
        for state in self.node_states():
            usable = state["status"] == "up" and not state["stale"]
            if not usable or (only is not None and state["id"] not in only):
                continue
            cap, used = state["capacity"], state["used"]
            rooms.append(
                Room(
                    state["id"],
                    cap["vcpus"] - used["vcpus"],
                    cap["memory_mb"] - used["memory_mb"],
                )
            )
        return rooms

    # -- tasks ----------------------------------------------------------------------------------
    def submit(self, specs: list[VMSpec], origin: str, only: Sequence[str] | None = None) -> str:
        """Place and record the burst, then dispatch it; the task id. Nothing is recorded
        or dispatched when it does not fit (InsufficientCapacity) or names unknown nodes."""
        if only is not None:
            unknown = sorted(set(only) - set(self.nodes))
            if unknown:
                raise InvalidInput(
                    "nodes", f"unknown node ids {unknown}; known: {sorted(self.nodes)}"
                )
        task_id = str(uuid.uuid4())
        with self._lock:
            demands = [Demand(s.vcpus, s.memory_mb) for s in specs]
            chosen = place(demands, self._rooms(only))
            taken = self.records.userids()
            userids: list[str] = []
            while len(userids) < len(specs):
                userid = "V" + "".join(secrets.choice(USERID_CHARS) for _ in range(7))
                if userid not in taken:
                    taken.add(userid)
                    userids.append(userid)
            self.records.create(task_id, origin, specs, chosen, userids)
        LOG.info("cluster task %s: %d VMs on %s", task_id, len(specs), sorted(set(chosen)))
        for vm in self.records.vms(task_id):
            self._pool.submit(self._bring_up, vm)
        return task_id

    def vms(self, task_id: str) -> list[VM]:
        return self.records.vms(task_id)

    def destroy(self, task_id: str) -> None:
        """Destroy every VM of a finished task (in the background)."""
        vms = self.records.vms(task_id)
        if not all(vm.status in model.FINISHED for vm in vms):
            raise Conflict(f"cluster task {task_id} is still in progress; destroy it when done")
        moving = [vm.userid for vm in vms if migration.migrating(vm)]
        if moving:
            raise Conflict(f"VMs {moving} of task {task_id} are migrating; destroy it after")
        for vm in vms:
            if vm.status != model.DELETED:
                self._pool.submit(self._destroy, self.records.update(vm, model.DELETING))

    def act(self, vm: VM, action: str) -> None:
        """Dispatch a per-VM action (in the background); Conflict, nothing dispatched, when
        the VM is not in a state to take it."""
        if action not in ACTIONS:
            raise InvalidInput("action", f"must be one of {sorted(ACTIONS)}")
        if migration.migrating(vm):
            raise Conflict(f"VM {vm.userid} is migrating; {action} it when it has moved")
        if action == "destroy":
            if vm.status not in (model.RUNNING, model.ERROR):
                raise Conflict(f"VM {vm.userid} is {vm.status}; destroy needs RUNNING or ERROR")
            self._pool.submit(self._destroy, self.records.update(vm, model.DELETING))
            return
        if vm.status != model.RUNNING:
            raise Conflict(f"VM {vm.userid} is {vm.status}; {action} needs RUNNING")
        LOG.info("cluster: %s of VM %s on %s", action, vm.userid, vm.node)
        self._pool.submit(self._power, vm, action)

    def migrate(self, vm: VM, destination: object) -> VM:
        """Check and dispatch a live migration of ``vm`` (in the background); the VM as
        recorded, migrating. ``InvalidInput`` naming ``destination`` or ``Conflict``: nothing
        recorded or dispatched (volt.cluster.migration.check)."""
        with self._lock:  # the destination's room is checked and taken at once
            vm = self.records.vm(vm.userid)
            target = migration.check(vm, destination, self.node_states())
            moving = {"state": migration.MIGRATING, "from": vm.node, "to": target}
            vm = self.records.note(vm, extra={**(vm.extra or {}), "migration": moving})
        LOG.info("cluster: VM %s migrates from %s to %s", vm.userid, vm.node, target)
        self._pool.submit(self._migrate, vm)
        return vm

    # -- workers --------------------------------------------------------------------------------
    def _client(self, node_id: str, timeout: float = CALL_TIMEOUT_S) -> Any:
        node = self.nodes[node_id]
        host = self._bus_host(node_id) if self.bus is not None else None
        if self.bus is not None and host is not None:
            return self.bus.client(node, host, timeout, self.client_factory(node, timeout))
        return self.client_factory(node, timeout)

    def _bus_host(self, node_id: str) -> str | None:
        """The host_ip whose bus queue the node takes guest calls on, as its last host
        info says; None for a node that says none (no transport_url, its listener not up):
        no call waits for it in vain."""
        probe = self.capacity.get(node_id)
        host = None if probe is None or probe.info is None else probe.info.get("bus")
        return host if isinstance(host, str) and BUS_HOST_RE.fullmatch(host) else None

    def _call(self, client: Any, userid: str, method: str, *args: Any) -> Any:
        """``client.call``, recorded as the VM's event with the transport that answered."""
        result = client.call(method, *args)
        try:
            self.events.dispatched(userid, method, getattr(client, "via", "") or "xmlrpc")
        except Exception:  # the history loses a line; the VM's step stays done
            LOG.exception("cluster: recording %s of %s", method, userid)
        return result

    def node_event(self, publisher_id: str, event_type: str, payload: Any) -> bool:
        """A node's ``vmthunder.guest.*`` notification into its VM's events; False (and
        nothing recorded) unless it comes from the node the VM is placed on, about a VM
        of ours, in the notification's shape."""
        if not isinstance(payload, dict):
            return False
        host, userid = payload.get("host"), payload.get("userid")
        if not isinstance(host, str) or publisher_id != f"virtman.{host}":
            return False
        if not isinstance(userid, str):
            return False
        try:
            vm = self.records.vm(userid)
        except model.VMNotFound:
            return False
        if vm.node is None or self._bus_host(vm.node) != host:
            LOG.warning("cluster: ignored %s about %s from %s: not its node", event_type,
                        userid, host)  # fmt: skip
            return False
        return self.events.from_node(host, userid, event_type, payload)

    def _bring_up(self, vm: VM) -> None:
        try:
            while vm.status != model.RUNNING:
                vm = self._attempt(vm)
                if vm.status == model.ERROR:
                    return
        except Exception:
            LOG.exception("cluster: VM %s of task %s", vm.name, vm.task_id)

    def _attempt(self, vm: VM) -> VM:
        """One try on ``vm.node``: RUNNING, or PENDING on another node, or ERROR."""
        assert vm.node is not None
        node = vm.node
        once = "_once" if self.bus is not None else ""  # a verb may be sent twice
        step = "guest_create"
        try:
            client = self._client(node)
            vm = self.records.update(vm, model.CREATING, attempts=vm.attempts + 1)
            self._call(client, vm.userid, f"guest_create{once}", vm.userid, vm.vcpus,
                       vm.memory_mb, 0)  # fmt: skip
            vm = self.records.update(vm, model.DEPLOYING)
            step = "guest_deploy"
            self._call(client, vm.userid, f"guest_deploy{once}", vm.userid, vm.image)
            vm = self.records.update(vm, model.STARTING)
            step = "guest_action start"
            self._call(client, vm.userid, "guest_action", vm.userid, "start")
            return self.records.update(vm, model.RUNNING, error=None)
        except Exception as exc:
            reason = f"{step} on {node}: {exc}"
            LOG.warning("cluster: VM %s of task %s: %s", vm.name, vm.task_id, reason)
        self._forget(node, vm.userid)
        if vm.attempts >= MAX_ATTEMPTS:
            return self.records.update(vm, model.ERROR, error=reason)
        with self._lock:
            try:
                (other,) = place([Demand(vm.vcpus, vm.memory_mb)], self._rooms(), exclude=[node])
            except InsufficientCapacity:
                return self.records.update(
                    vm, model.ERROR, error=f"{reason}; no other node has room for a retry"
                )
            LOG.info("cluster: VM %s retried on %s after %s", vm.name, other, reason)
            return self.records.update(vm, model.PENDING, node=other, error=reason)

    def _forget(self, node: str, userid: str) -> None:
        """Best effort: the guest's leftovers on a node that failed it."""
        try:
            client = self._client(node, INFO_TIMEOUT_S * 2)
            with contextlib.suppress(Exception):  # not started, or gone with its node
                client.call("guest_action", userid, "stop")
            client.call("guest_delete", userid)
        except Exception as exc:
            LOG.info("cluster: leftovers of %s on %s not deleted: %s", userid, node, exc)

    def _power(self, vm: VM, action: str) -> None:
        """One action, then the power the node reports, recorded; one VM's actions run one
        at a time, so the last record is the node's state after the last action."""
        method = POWER_ACTIONS[action]
        with self._vm_lock(vm.userid):
            try:
                vm = self.records.vm(vm.userid)  # what an earlier action left
                if vm.status != model.RUNNING:
                    LOG.info("cluster: %s of %s dropped: it is %s", action, vm.userid, vm.status)
                    return
                assert vm.node is not None
                client = self._client(vm.node)
                try:
                    self._call(client, vm.userid, "guest_action", vm.userid, method)
                    power = self._call(client, vm.userid, "guest_power_state", vm.userid)
                except Exception as exc:
                    LOG.warning("cluster: %s of %s on %s: %s", action, vm.userid, vm.node, exc)
                    self.records.note(vm, error=f"{action} on {vm.node}: {exc}")
                    return
                self.records.note(vm, extra={**(vm.extra or {}), "power": power}, error=None)
            except Exception:  # e.g. destroyed meanwhile (Conflict)
                LOG.exception("cluster: recording %s of %s", action, vm.userid)

    def _migrate(self, vm: VM) -> None:
        """Prepare the destination, migrate from the source, finish on the destination;
        on a failure the guest stays on the source and the destination is undone."""
        with self._vm_lock(vm.userid):
            moving = migration.migration_of(vm)
            source, target = str(moving["from"]), str(moving["to"])
            step = f"guest_migrate_prepare on {target}"
            try:
                incoming = self._client(target).call(
                    "guest_migrate_prepare", vm.userid, vm.vcpus, vm.memory_mb, vm.image
                )
                step = f"guest_migrate on {source}"
                answer = self._client(source).call("guest_migrate", vm.userid, incoming)
            except Exception as exc:
                reason = f"{step}: {exc}"
                if self._undo_incoming(vm.userid, target) != "running":
                    LOG.warning("cluster: migration of %s failed: %s", vm.userid, reason)
                    self._record_migration(vm, source, migration.FAILED, moving, reason)
                    return
                LOG.warning("cluster: %s: %s, yet it runs on %s", vm.userid, reason, target)
                answer = {}
            error = None
            try:
                self._client(target).call("guest_migrate_finish", vm.userid)
            except Exception as exc:  # it runs there: recorded there, with the reason
                error = f"guest_migrate_finish on {target}: {exc}"
                LOG.warning("cluster: migration of %s: %s", vm.userid, error)
            done = {**moving, **migration.stats_of(answer)}
            self._record_migration(vm, target, migration.DONE, done, error)
            LOG.info("cluster: VM %s moved from %s to %s: %s", vm.userid, source, target, done)

    # -- after a restart --------------------------------------------------------------------------
    def _resume(self, owner: str | None) -> None:
        """Take up the steps a previous run left in the middle (volt-api was killed or
        restarted during a burst, a destroy or a migration): found here, done by the
        pool."""
        try:
            vms = self.records.unfinished(owner)
        except Exception:
            LOG.exception("cluster: finding the work a previous run left unfinished")
            return
        taken = []
        for vm in vms:
            if vm.status == model.RUNNING:
                if migration.migrating(vm):
                    self._pool.submit(self._settle_migration, vm)
                    taken.append(f"{vm.userid} (migrating)")
                continue
            work = {model.DELETING: self._destroy, model.PENDING: self._bring_up}
            self._pool.submit(work.get(vm.status, self._bring_up_again), vm)
            taken.append(f"{vm.userid} ({vm.status})")
        if taken:
            LOG.warning("cluster: resuming what a previous run left unfinished: %s",
                        ", ".join(taken))  # fmt: skip

    def _bring_up_again(self, vm: VM) -> None:
        """A bring-up cut in its middle: what its node made of the guest is deleted, then
        it starts over there (a node that fails it passes it on, as in a burst)."""
        assert vm.node is not None
        self._forget(vm.node, vm.userid)
        try:
            vm = self.records.update(vm, model.PENDING, error=None)
        except Exception:
            LOG.exception("cluster: resuming VM %s", vm.userid)
            return
        self._bring_up(vm)

    def _settle_migration(self, vm: VM) -> None:
        """A migration cut in its middle: ask both nodes (every SETTLE_INTERVAL_S, until
        they answer) where the guest is, then finish it there or undo the arrival."""
        moving = migration.migration_of(vm)
        source, target = str(moving["from"]), str(moving["to"])
        with self._vm_lock(vm.userid):
            while True:
                try:
                    where = migration.settled(
                        self._power_or_gone(source, vm.userid),
                        self._power_or_gone(target, vm.userid),
                    )
                except Exception as exc:  # a node does not answer: ask again later
                    LOG.info("cluster: where did %s go? %s", vm.userid, exc)
                    where = None
                if where is not None or self._closing.wait(SETTLE_INTERVAL_S):
                    break
            if where == "moved":
                error = None
                try:
                    self._client(target).call("guest_migrate_finish", vm.userid)
                except Exception as exc:
                    error = f"guest_migrate_finish on {target}: {exc}"
                self._record_migration(vm, target, migration.DONE, moving, error)
                LOG.warning("cluster: VM %s had moved to %s during the restart", vm.userid,
                            target)  # fmt: skip
            elif where == "stayed":
                self._undo_incoming(vm.userid, target)
                reason = f"volt-api restarted during the migration; the guest stays on {source}"
                self._record_migration(vm, source, migration.FAILED, moving, reason)
                LOG.warning("cluster: VM %s: %s", vm.userid, reason)

    def _power_or_gone(self, node: str, userid: str) -> str:
        try:
            return str(self._client(node, INFO_TIMEOUT_S).call("guest_power_state", userid))
        except Exception as exc:
            if no_such_guest(exc):
                return migration.GONE
            raise

    def _undo_incoming(self, userid: str, target: str) -> str:
        """The destination's answer to ``guest_migrate_abort``: "removed", "running" (the
        guest did arrive) or "unknown" when the node does not answer."""
        try:
            return str(self._client(target).call("guest_migrate_abort", userid))
        except Exception as exc:
            LOG.warning("cluster: undoing %s's arrival on %s: %s", userid, target, exc)
            return "unknown"

    def _record_migration(
        self, vm: VM, node: str, state: str, moving: dict[str, object], error: str | None
    ) -> None:
        try:
            vm = self.records.vm(vm.userid)
            extra = {**(vm.extra or {}), "migration": {**moving, "state": state}}
            self.records.note(vm, node=node, extra=extra, error=error)
        except Exception:
            LOG.exception("cluster: recording the migration of %s", vm.userid)

    def _vm_lock(self, userid: str) -> threading.Lock:
        with self._lock:
            return self._vm_locks.setdefault(userid, threading.Lock())

    def _destroy(self, vm: VM) -> None:
        try:
            assert vm.node is not None
            client = self._client(vm.node)
            try:
                client.call("guest_action", vm.userid, "stop")
            except Exception as exc:  # an ERROR VM may have no domain
                LOG.info("cluster: stop of %s on %s: %s", vm.userid, vm.node, exc)
            try:
                client.call("guest_delete", vm.userid)
            except Exception as exc:
                if not no_such_guest(exc):
                    raise
            self.records.update(vm, model.DELETED)
        except Exception as exc:  # ERROR names the node and the whole reason: destroy again
            reason = f"destroy on {vm.node}: {exc}"
            LOG.warning("cluster: VM %s of task %s: %s", vm.name, vm.task_id, reason)
            self.records.update(vm, model.ERROR, error=reason)
