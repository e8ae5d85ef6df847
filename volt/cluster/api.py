"""The controller's HTTP operations, served by volt-api (volt.api.app routes them)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from volt.api.request import Request, Response, parse_json
from volt.cluster import migration, model, snooze, status
from volt.cluster.controller import ACTIONS, Controller
from volt.cluster.events import dispatch_counts
from volt.cluster.model import VMSpec
from volt.errors import InvalidInput, RouteNotFound
from volt.service import VoltService

MAX_COUNT = 256
CLUSTER_KEYS = {"image", "count", "flavor", "nodes", "name"}
# The status page's files (volt/cluster/static): public, they hold no data.
PAGE_FILES = {
    "status.html": "text/html; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}
# Scripts, styles and fetches from volt-api only, no inline script, no framing, no referrer.
PAGE_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]


def vm_id(value: str) -> str:
    if not snooze.USERID_RE.fullmatch(value):
        raise InvalidInput("vm_id", "must be a VM's userid (1-8 of A-Z 0-9)")
    return value


def action_request(body: Any) -> str:
    """The action of a ``POST /v1/vms/{vm_id}/action`` body."""
    if not isinstance(body, dict) or set(body) != {"action"}:
        raise InvalidInput("body", 'must be {"action": ...}')
    action = body["action"]
    if not isinstance(action, str) or action not in ACTIONS:
        raise InvalidInput("action", f"must be one of {sorted(ACTIONS)}")
    return action


def _int(value: Any, field: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise InvalidInput(field, f"must be an integer in [{low}, {high}]")
    return value


def cluster_request(body: Any) -> tuple[list[VMSpec], list[str] | None]:
    """The VMs and the allowed nodes of a ``POST /v1/clusters`` body."""
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    unknown = sorted(set(body) - CLUSTER_KEYS)
    if unknown:
        raise InvalidInput("body", f"unknown keys {unknown}; allowed: {sorted(CLUSTER_KEYS)}")
    image = body.get("image")
    if not isinstance(image, str) or not snooze.IMAGE_RE.fullmatch(image):
        raise InvalidInput("image", "must be 1-255 of A-Z a-z 0-9 . _ -")
    count = _int(body.get("count"), "count", 1, MAX_COUNT)
    flavor = body.get("flavor")
    if not isinstance(flavor, dict) or set(flavor) != {"vcpus", "memory_mb"}:
        raise InvalidInput("flavor", "must be {vcpus, memory_mb}")
    vcpus = _int(flavor["vcpus"], "flavor.vcpus", 1, 256)
    memory_mb = _int(flavor["memory_mb"], "flavor.memory_mb", 16, 1 << 24)
    prefix = body.get("name", image)
    if not isinstance(prefix, str) or not snooze.NAME_RE.fullmatch(prefix) or len(prefix) > 56:
        raise InvalidInput("name", "must be 1-56 of A-Z a-z 0-9 . _ -")
    nodes = body.get("nodes")
    if nodes is not None and (
        not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes)
    ):
        raise InvalidInput("nodes", "must be a non-empty list of node ids")
    specs = [VMSpec(f"{prefix}-{i}", image, vcpus, memory_mb) for i in range(count)]
    return specs, nodes


class ClusterHandlers:
    def __init__(self, controller: Controller, service: VoltService) -> None:
        self.controller = controller
        self.service = service
        static = resources.files("volt.cluster").joinpath("static")
        self.page_files = {name: static.joinpath(name).read_bytes() for name in PAGE_FILES}

    # -- /v1 ------------------------------------------------------------------------------------
    def create(self, req: Request) -> Response:
        specs, nodes = cluster_request(req.body)
        task_id = self.controller.submit(specs, "v1", nodes)
        return Response(
            202, {"task": task_id, "href": f"/v1/clusters/{task_id}"},
            headers=[("Location", f"/v1/clusters/{task_id}")],
        )  # fmt: skip

    def show(self, req: Request) -> Response:
        task_id = snooze.task_id(req.params["task_id"].encode())
        vms = self.controller.vms(task_id)
        events = self.controller.events.of(vm.userid for vm in vms)
        return Response(
            200,
            {
                "task": task_id,
                "status": model.task_status(vms),
                "vms": [
                    {
                        **vm.view(),
                        "events": events[vm.userid],
                        "dispatch": dispatch_counts(events[vm.userid]),
                    }
                    for vm in vms
                ],
            },
        )

    def delete(self, req: Request) -> Response:
        task_id = snooze.task_id(req.params["task_id"].encode())
        self.controller.destroy(task_id)
        return Response(202, {"task": task_id})

    def show_vm(self, req: Request) -> Response:
        return Response(200, self.controller.records.vm(vm_id(req.params["vm_id"])).view())

    def vm_action(self, req: Request) -> Response:
        vm = self.controller.records.vm(vm_id(req.params["vm_id"]))
        action = action_request(req.body)
        self.controller.act(vm, action)
        href = f"/v1/vms/{vm.userid}"
        return Response(202, {"vm": vm.userid, "action": action, "href": href})

    def migrate(self, req: Request) -> Response:
        vm = self.controller.records.vm(vm_id(req.params["vm_id"]))
        vm = self.controller.migrate(vm, migration.destination_of(req.body))
        moving = migration.migration_of(vm)
        href = f"/v1/vms/{vm.userid}"
        return Response(202, {"vm": vm.userid, "from": moving["from"], "to": moving["to"],
                              "href": href})  # fmt: skip

    def nodes(self, req: Request) -> Response:
        return Response(200, self.controller.node_states())

    # -- the status page ---------------------------------------------------------------------
    def status(self, req: Request) -> Response:
        return Response(
            200,
            status.snapshot(self.service, self.controller),
            headers=[("Cache-Control", "no-store")],
        )

    def page(self, req: Request) -> Response:
        return self._file("status.html")

    def page_file(self, req: Request) -> Response:
        name = req.params["name"]
        if name not in PAGE_FILES:
            raise RouteNotFound(f"no such status page file: {name!r}")
        return self._file(name)

    def _file(self, name: str) -> Response:
        return Response(
            200,
            raw=self.page_files[name],
            content_type=PAGE_FILES[name],
            headers=list(PAGE_HEADERS),
        )

    # -- Snooze ---------------------------------------------------------------------------------
    def groupmanager(self, req: Request) -> Response:
        raw = req.body if isinstance(req.body, bytes) else b""
        if req.query == "startVirtualCluster":
            specs = snooze.start_request(parse_json(raw))
            task_id = self.controller.submit(specs, "snooze")
            return Response(200, raw=task_id.encode(), content_type="text/plain")
        if req.query == "getVirtualClusterResponse":
            task_id = snooze.task_id(raw)
            answer = snooze.cluster_response(
                self.controller.vms(task_id),
                self.controller.controller_id,
                self.controller.address,
                self.controller.nodes,
            )
            if answer is None:
                return Response(200, raw=b"")
            return Response(200, answer)
        if req.query in snooze.VM_VERBS:
            return self._vm_verb(req.query, raw)
        if req.query == "migrateVirtualMachine":
            name, node, destination = snooze.migrate_request(parse_json(raw))
            vm = snooze.pick(self.controller.records.live_named(name), name, node)
            self.controller.migrate(vm, destination)
            return Response(200, True)
        raise RouteNotFound(f"no such group manager method: {req.query!r}")

    def bootstrap(self, req: Request) -> Response:
        if req.query != "getLocalControllerList":
            raise RouteNotFound(f"no such bootstrap method: {req.query!r}")
        states = self.controller.node_states()
        return Response(200, snooze.local_controllers(states, self.controller.nodes))

    def bootstrap_vm(self, req: Request) -> Response:
        """Snooze's bootstrap takes the per-VM verbs too (body: the VM id)."""
        if req.query not in snooze.VM_VERBS:
            raise RouteNotFound(f"no such bootstrap method: {req.query!r}")
        return self._vm_verb(req.query, req.body if isinstance(req.body, bytes) else b"")

    def _vm_verb(self, verb: str, raw: bytes) -> Response:
        """A ``...VirtualMachine`` verb: the same per-VM action as ``POST /v1/vms/{id}/action``."""
        body: Any = parse_json(raw) if raw.strip()[:1] in (b"{", b'"') else raw
        name, node = snooze.vm_reference(body)
        vm = snooze.pick(self.controller.records.live_named(name), name, node)
        self.controller.act(vm, snooze.VM_VERBS[verb])
        return Response(200, True)
