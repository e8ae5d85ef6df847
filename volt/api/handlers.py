"""Handlers of the REST API: one function per operation, plain data in and out."""

from __future__ import annotations

from typing import Any

from volt import validation
from volt.api import schemas
from volt.api.request import Request, Response
from volt.deathwatch import DeathWatch, Report
from volt.errors import InvalidInput
from volt.service import VoltService
from volt.topology import Node

NOT_PLACEABLE = {"peer_id": None, "parents": [{"peer_id": None}]}


def _identities(nodes: list[Node]) -> list[dict[str, Any]]:
    return [n.identity() for n in nodes]


def _caller(req: Request, body: dict[str, Any]) -> str:
    """The node's host: a node token's own host (a body ``host`` must be the same); with
    the admin credential or noauth, the body's ``host`` if given, else the source address."""
    host = req.credential.own_host(body.get("host"))
    return host or validation.host(req.remote_addr, "remote address")


def _volume_id(req: Request) -> str:
    return validation.volume_id(req.params["volume_id"])


def _peer_id(req: Request, volume_id: str) -> str:
    """The path's peer id; a node token may only name a peer of its own host."""
    host, peer_volume = validation.split_peer_id(req.params["peer_id"])
    if peer_volume != volume_id:
        raise InvalidInput("peer_id", f"names volume {peer_volume!r}, not {volume_id!r}")
    req.credential.own_host(host, "peer_id host")
    return validation.make_peer_id(host, peer_volume)


class Handlers:
    def __init__(self, service: VoltService, deathwatch: DeathWatch | None = None) -> None:
        self.service = service
        self.deathwatch = deathwatch or DeathWatch(service)

    def query(self, req: Request) -> Response:
        volume_id = _volume_id(req)
        body = schemas.extract(req.body, schemas.QUERY)
        if "peer_id" in body:
            req.credential.own_host(body["peer_id"][0], "peer_id host")
        host = _caller(req, body)
        if "peer_id" in body and body["peer_id"] != (host, volume_id):
            raise InvalidInput(
                "peer_id", f"must be {validation.make_peer_id(host, volume_id)!r} for this caller"
            )
        placement = self.service.query(volume_id, host)
        if placement.node is None:
            return Response(200, NOT_PLACEABLE)
        return Response(
            200, {"peer_id": placement.node.peer_id, "parents": _identities(placement.parents)}
        )

    def register(self, req: Request) -> Response:
        volume_id = _volume_id(req)
        peer_id = _peer_id(req, volume_id)
        body = schemas.extract(req.body, schemas.REGISTER, schemas.REGISTER_REQUIRED)
        host = req.credential.own_host(body.get("host"))
        if host is None:
            raise InvalidInput("host", "is required")
        placement = self.service.register(
            volume_id,
            peer_id,
            host,
            body["port"],
            body["iqn"],
            body["lun"],
            nbd_port=body.get("nbd_port"),
            place=body.get("place", False),
        )
        assert placement.node is not None
        # the original's identity dict, plus the node's parents now (clients that do not
        # know the key ignore it): the registered node follows them without a heartbeat
        answer: dict[str, Any] = dict(placement.node.identity())
        answer["parents"] = _identities(placement.parents)
        return Response(200, answer)

    def leave(self, req: Request) -> Response:
        volume_id = _volume_id(req)
        self.service.leave(volume_id, _peer_id(req, volume_id))
        return Response(200)

    def dead_parent(self, req: Request) -> Response:
        """A child reports that its parent stopped serving it (volt/deathwatch.py): a node
        token may report only for its own peer ids (403), about one of their parents in
        the same image (400); the check and the eviction follow in the background."""
        volume_id = _volume_id(req)
        reporter = _peer_id(req, volume_id)
        body = schemas.extract(req.body, schemas.DEAD_PARENT, ("parent",))
        host, parent_volume = body["parent"]
        if parent_volume != volume_id:
            raise InvalidInput("parent", f"names volume {parent_volume!r}, not {volume_id!r}")
        parent = validation.make_peer_id(host, parent_volume)
        if parent == reporter:
            raise InvalidInput("parent", "is the reporter itself")
        result = self.deathwatch.report(Report(volume_id, reporter, parent, "api"))
        return Response(202, {"result": result})

    def delete_volume(self, req: Request) -> Response:
        self.service.delete_volume(_volume_id(req))
        return Response(200)

    def list_volumes(self, req: Request) -> Response:
        counts = self.service.volume_counts()
        return Response(200, [{"id": vid, "count": count} for vid, count in counts])

    def show_volume(self, req: Request) -> Response:
        entries = []
        for node, parents in self.service.volume_nodes(_volume_id(req)):
            assert node.parent is not None
            entry: dict[str, Any] = node.identity()
            entry["parent"] = node.parent.peer_id
            entry["depth"] = node.depth
            entry["parents"] = [p.peer_id for p in parents]
            entries.append(entry)
        return Response(200, entries)

    def heartbeat(self, req: Request) -> Response:
        body = schemas.extract(req.body, schemas.HEARTBEAT)
        host = _caller(req, body)
        if "bytes_read" in body:  # an extension: the original's nodes send none
            self.service.traffic.report(host, body["bytes_read"])
        answer = self.service.heartbeat(host, api_port=body.get("api_port"))
        return Response(
            200,
            [
                {"peer_id": node.peer_id, "parents": _identities(parents)}
                for node, parents in answer
            ],
        )

    def list_members(self, req: Request) -> Response:
        return Response(
            200,
            [
                {
                    "host": m.host,
                    "seconds_since_heartbeat": round(m.seconds_since_heartbeat, 3),
                    "peer_ids": m.peer_ids,
                }
                for m in self.service.member_list()
            ],
        )
