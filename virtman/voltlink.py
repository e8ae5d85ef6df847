"""Virtman's side of the Volt protocol: join an image's tree, register the relay, heartbeat."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from brick import values
from brick.exception import Timeout
from brick.wait import wait_until
from virtman.errors import ParentsUnavailable
from virtman.layers.base import Endpoint, Relay
from voltclient import Client
from voltclient.client import Volume
from voltclient.exceptions import VoltClientError

LOG = logging.getLogger(__name__)


def parent_endpoints(parents: list[Volume]) -> list[Endpoint]:
    """Volt's parents (ordered; the first carries the reads) as endpoints, skipping those
    that are not ready yet. An empty list means: read from the image servers."""
    endpoints = []
    for p in parents:
        if not p.ready or not (p.host and p.port and p.iqn and p.lun):
            continue
        nbd = values.join_host_port(p.host, p.nbd_port) if p.nbd_port else None
        portal = values.join_host_port(p.host, p.port)
        endpoints.append(Endpoint(portal, p.iqn, int(p.lun), nbd, p.peer_id))
    return endpoints


def pending_parents(parents: list[Volume]) -> bool:
    return any(not p.ready for p in parents)


def _refused_field(exc: VoltClientError) -> str | None:
    """The body field a 400 ``volt.invalid_input`` names (``invalid '<field>': …``)."""
    if exc.code != "volt.invalid_input" or not exc.detail.startswith("invalid '"):
        return None
    return exc.detail[len("invalid '") :].split("'", 1)[0]


class VoltLink:
    def __init__(
        self,
        url: str,
        token: str | None,
        host_ip: str,
        *,
        timeout: float = 10.0,
        ca_file: str | None = None,
        stop: threading.Event | None = None,
        api_port: int | None = None,
    ):
        self.client = Client(url, token=token, timeout=timeout, ca_file=ca_file)
        self.host_ip = host_ip
        self.stop = stop or threading.Event()  # set: every join waiting for Volt ends now
        self.counters_refused = False  # this Volt answered 400 on a heartbeat's bytes_read
        # The node daemon's port, announced in every heartbeat for Volt's liveness probe
        # (None: not announced; also once a Volt without the extension refused it).
        self.api_port = api_port

    def join(
        self,
        image: str,
        *,
        timeout_s: float,
        quiet: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> tuple[str, list[Volume]]:
        """Place this node in the image's tree; retries while Volt answers "not placeable"
        (btree executors) or cannot be reached, until ``timeout_s``. ``quiet`` (a retry in
        the background, which has its own backoff): failures are debug messages, and an
        unreachable Volt ends the attempt at once (``ParentsUnavailable``) instead of
        holding the image for ``timeout_s``."""
        failures = 0

        def placed() -> tuple[str, list[Volume]] | None:
            nonlocal failures
            if self.stop.is_set():
                raise ParentsUnavailable(image, 0, "virtman is stopping")
            try:
                peer_id, parents = self.client.volumes.get(image, host=self.host_ip)
                if peer_id is not None:
                    return peer_id, parents
                LOG.info("%s: Volt says not placeable yet, retrying", image)
            except VoltClientError as exc:
                if quiet:
                    LOG.debug("%s: Volt query failed: %s", image, exc)
                    raise ParentsUnavailable(image, 0, f"Volt unreachable ({exc})") from exc
                failures += 1  # the first failure is a warning; its retries are not news
                (LOG.warning if failures == 1 else LOG.debug)(
                    "%s: Volt query failed: %s", image, exc
                )
            return None

        try:  # retries after 0.2 s, then 1.5 times longer each time, up to 5 s
            return wait_until(
                placed,
                timeout_s=timeout_s,
                what=f"Volt's placement of {image}",
                interval_s=0.2,
                backoff=1.5,
                max_interval_s=5.0,
                clock=clock,
                sleep=self.stop.wait,  # a stop wakes the wait; ``placed`` then ends it
            )
        except Timeout:
            raise ParentsUnavailable(image, timeout_s) from None

    def register(self, image: str, peer_id: str, relay: Relay) -> list[Volume] | None:
        """Register the relay; returns the node's parents now (None from a Volt that does
        not answer them): registering can lift the node above pending ancestors."""
        _, parents = self._login(image, peer_id, relay, place=False)
        return parents

    def _login(
        self, image: str, peer_id: str, relay: Relay, *, place: bool
    ) -> tuple[Volume, list[Volume] | None]:
        where = values.Portal.parse(relay.portal, names=True)
        nbd_port = values.Portal.parse(relay.nbd, names=True).port if relay.nbd else None
        return self.client.volumes.login_with_parents(
            image, peer_id, where.host, where.port, relay.iqn, 1, nbd_port, place=place
        )

    def place_and_register(self, image: str, relay: Relay) -> tuple[str, list[Volume]] | None:
        """Register the relay of a node not placed yet: Volt places it in the same request
        (issue 15: one request per node of a burst, not a query and then a registration).
        Returns (peer id, parents now), or None when Volt cannot place it so (a btree
        executor: 409 ``volt.peer.not_placeable``; a Volt without the extension: 400 on
        ``place``): the caller then joins and registers as before."""
        peer_id = values.join_host_port(self.host_ip, image)
        try:
            node, parents = self._login(image, peer_id, relay, place=True)
        except VoltClientError as exc:
            if exc.code == "volt.peer.not_placeable" or (
                exc.code == "volt.invalid_input" and "place" in exc.detail
            ):
                LOG.debug("%s: Volt does not place on register: %s", image, exc.detail)
                return None
            raise
        if parents is None or node.peer_id is None:
            return None  # an original volt-api ignored the extension
        return node.peer_id, parents

    def leave(self, image: str, peer_id: str) -> None:
        self.client.volumes.logout(image, peer_id)

    def report_dead_parent(self, image: str, peer_id: str, parent: str) -> str:
        """Tell Volt that ``parent`` stopped serving ``peer_id`` (REST); Volt's answer."""
        return self.client.volumes.report_dead_parent(image, peer_id, parent)

    def heartbeat(self, bytes_read: list[dict[str, Any]] | None = None) -> dict[str, list[Volume]]:
        """{peer_id: parents} for every node of this host that Volt knows. ``bytes_read``
        (the nodes' read counters) and ``api_port`` go along unless this Volt refused them
        once (a Volt without the extension): then the refused one is never sent again."""
        if self.counters_refused:
            bytes_read = None
        for _ in range(3):  # at most one refusal per extension
            extra = {"api_port": self.api_port} if self.api_port is not None else {}
            try:
                answer = self.client.members.heartbeat(self.host_ip, bytes_read, **extra)
                break
            except VoltClientError as exc:
                refused = _refused_field(exc)
                if refused == "bytes_read" and bytes_read is not None:
                    LOG.info(
                        "Volt does not take read counters (%s): heartbeats without them",
                        exc.detail,
                    )
                    self.counters_refused = True
                    bytes_read = None
                elif refused == "api_port" and self.api_port is not None:
                    LOG.info(
                        "Volt does not take the node daemon's port (%s): heartbeats without it",
                        exc.detail,
                    )
                    self.api_port = None
                else:
                    raise
        else:  # pragma: no cover (each extension is dropped once at most)
            raise AssertionError("heartbeat extensions refused more than once")
        return {item["peer_id"]: item["parents"] for item in answer}
