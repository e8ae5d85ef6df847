"""Virtman's side of the control bus (docs/bus.rst): listen on ``vmthunder-node.<host_ip>``
for Volt's parent pushes, and send the node's stack events as notifications.

A push is applied through the same path as a heartbeat answer (``on_parents``); a push for
another host, or that does not parse, is logged and ignored. The cluster controller's guest
calls (namespace ``guest``) run the node's own guest verbs (``serve_guests``) after the same
checks as XML-RPC: addressed to this host, the node's ``api_token``, a verb of
``brick.bus.GUEST_METHODS``; each is reported as ``vmthunder.guest.*`` notifications.
Nothing here blocks a create, a destroy or the heartbeat: the listener runs in
oslo.messaging's threads (started in the background: a broker down at start only delays
it), notifications go through a ``brick.bus.Sender``.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from typing import Any

from oslo_config import cfg

from brick import bus
from voltclient.client import Volume

LOG = logging.getLogger(__name__)

Pushed = dict[str, list[Volume]]  # peer_id -> parents, as VoltLink.heartbeat answers


def parse_push(host_ip: str, host: Any, nodes: Any) -> Pushed:
    """The parents of a ``parents_changed`` message for this host; ValueError if it is not
    one (wrong host, or not the heartbeat's shape)."""
    if host != host_ip:
        raise ValueError(f"addressed to host {host!r}, not {host_ip!r}")
    if not isinstance(nodes, list):
        raise ValueError("nodes is not a list")
    pushed: Pushed = {}
    for entry in nodes:
        if not isinstance(entry, dict) or not isinstance(entry.get("peer_id"), str):
            raise ValueError(f"bad node entry {entry!r}")
        parents = entry.get("parents")
        if not isinstance(parents, list) or not all(isinstance(p, dict) for p in parents):
            raise ValueError(f"bad parents of {entry['peer_id']!r}")
        pushed[entry["peer_id"]] = [Volume.from_dict(p) for p in parents]
    return pushed


class _Endpoint:
    def __init__(self, node: NodeBus) -> None:
        import oslo_messaging

        self.target = oslo_messaging.Target(version=bus.API_VERSION)
        self.node = node

    def parents_changed(self, ctxt: Any, host: Any = None, nodes: Any = None) -> None:
        self.node.received(host, nodes)


class GuestRefused(Exception):
    """A guest call this node does not run (another host's, a wrong token, no such verb)."""


class _GuestEndpoint:
    def __init__(self, node: NodeBus) -> None:
        import oslo_messaging

        self.target = oslo_messaging.Target(namespace=bus.GUEST_NAMESPACE, version=bus.API_VERSION)
        self.node = node

    def guest_call(self, ctxt: Any, host: Any = None, verb: Any = None, args: Any = None) -> Any:
        import oslo_messaging

        # A refusal or the verb's own error is the caller's answer, not the server's fault:
        # no traceback in this node's log for it (guest_call logs it in a line).
        try:
            return self.node.guest_call(ctxt, host, verb, args)
        except Exception:
            raise oslo_messaging.ExpectedException() from None


class NodeBus:
    """:param on_parents: applies pushed parents (``{peer_id: [Volume]}``), as a heartbeat
    answer is applied."""

    def __init__(
        self,
        url: str,
        host_ip: str,
        on_parents: Callable[[Pushed], None],
        *,
        conf: cfg.ConfigOpts | None = None,
        transports: tuple[Any, Any] | None = None,
    ) -> None:
        import oslo_messaging

        conf = conf or cfg.CONF
        bus.quiet_reconnects()
        rpc, notifications = transports or (
            bus.rpc_transport(conf, url),
            bus.notification_transport(conf, url),
        )
        self.url = url
        self.host_ip = host_ip
        self.on_parents = on_parents
        self.pushes = 0  # pushes applied
        self.rejected = 0
        target = oslo_messaging.Target(topic=bus.NODE_TOPIC, server=host_ip)
        self._server = oslo_messaging.get_rpc_server(
            rpc,
            target,
            [_Endpoint(self), _GuestEndpoint(self)],
            executor="threading",
            access_policy=oslo_messaging.DefaultRPCAccessPolicy,
        )
        self._notifier = oslo_messaging.Notifier(
            notifications,
            publisher_id=f"virtman.{host_ip}",
            driver="messagingv2",
            topics=[bus.EVENTS_TOPIC],
            retry=bus.SEND_RETRY,
        )
        self.health = bus.Health("virtman notifications")
        self.sender = bus.Sender("virtman-bus-notify", self._notify, self.health)
        self._started = threading.Event()
        self._starter: threading.Thread | None = None
        self._guests: Any = None  # virtman.server.Methods, once serve_guests is called
        self._token: str | None = None
        self.guest_calls = 0  # guest verbs run for the controller

    def start(self) -> NodeBus:
        self._starter = threading.Thread(target=self._start, name="virtman-bus", daemon=True)
        self._starter.start()
        return self

    def _start(self) -> None:
        try:
            self._server.start()  # connects (and retries) before it returns
        except Exception:
            LOG.exception("control bus listener could not start; heartbeats only")
            return
        self._started.set()
        LOG.info(
            "control bus on %s: listening on %s.%s",
            bus.safe_url(self.url),
            bus.NODE_TOPIC,
            self.host_ip,
        )

    @property
    def serves_guests(self) -> bool:
        """Whether the controller's guest calls can come over the bus now (listening, and
        ``serve_guests`` called): the node's host info says so (``bus``)."""
        return self._started.is_set() and self._guests is not None

    def wait_started(self, timeout_s: float) -> bool:
        return self._started.wait(timeout_s)

    def received(self, host: Any, nodes: Any) -> None:
        try:
            pushed = parse_push(self.host_ip, host, nodes)
        except ValueError as exc:
            self.rejected += 1
            LOG.warning("ignoring a parents_changed message: %s", exc)
            return
        LOG.info("Volt pushed new parents of %s", ", ".join(sorted(pushed)))
        self.on_parents(pushed)
        self.pushes += 1

    # -- the controller's guest calls -----------------------------------------------------
    def serve_guests(self, methods: Any, token: str | None) -> None:
        """Run the controller's guest calls on ``methods`` (virtman.server.Methods), for
        callers that give ``token`` (the node's api_token; None: noauth, as XML-RPC)."""
        self._token = token
        self._guests = methods

    def guest_call(self, ctxt: Any, host: Any, method: Any, args: Any) -> Any:
        """One guest verb for the controller; ``GuestRefused`` (and nothing run) if the
        call is not for this host, lacks the token or names no verb of GUEST_METHODS."""
        try:
            userid = self._check(ctxt, host, method, args)
        except GuestRefused as exc:
            self.rejected += 1
            LOG.warning("refused a guest call over the bus: %s", exc)
            raise
        payload = {"userid": userid, "step": method}
        self.event(bus.EVENT_GUEST_PROGRESS, dict(payload, state="started"))
        try:
            result = getattr(self._guests, method)(*args)
        except Exception as exc:
            LOG.warning("guest call over the bus: %s(%s) failed: %s", method, userid, exc)
            self.event(bus.EVENT_GUEST_FAILED, dict(payload, error=str(exc)), error=True)
            raise
        self.guest_calls += 1
        LOG.info("guest call over the bus: %s(%s) done", method, userid)
        self.event(bus.EVENT_GUEST_PROGRESS, dict(payload, state="done"))
        return result

    def _check(self, ctxt: Any, host: Any, method: Any, args: Any) -> str:
        """The call's userid (its first argument) once it passed every check."""
        if host != self.host_ip:
            raise GuestRefused(f"addressed to host {host!r}, not {self.host_ip!r}")
        given = ctxt.get("token") if isinstance(ctxt, dict) else None
        if self._token is not None and not (
            isinstance(given, str)
            and hmac.compare_digest(given.encode("utf-8", "replace"), self._token.encode())
        ):
            raise GuestRefused(f"{method!r}: {'wrong' if given else 'no'} token")
        if self._guests is None:
            raise GuestRefused("this node serves no guests")
        if method not in bus.GUEST_METHODS:
            raise GuestRefused(f"no guest verb {method!r} over the bus")
        if not (isinstance(args, list) and 1 <= len(args) <= 8 and isinstance(args[0], str)):
            raise GuestRefused(f"{method}: args must be a list of 1-8, the userid first")
        return args[0]

    # -- notifications -------------------------------------------------------------------
    @property
    def up(self) -> bool:
        """Whether notifications go out now (the listener connected, the last send worked)."""
        return self._started.is_set() and not self.health.down

    def event(
        self,
        event_type: str,
        payload: dict[str, Any],
        *,
        error: bool = False,
        fallback: Callable[[], None] | None = None,
    ) -> None:
        """Queue a notification (never blocks); ``fallback`` runs (in the sender's thread)
        if the bus does not take it."""
        self.sender.put((event_type, dict(payload, host=self.host_ip), error, fallback))

    def _notify(self, item: tuple[str, dict[str, Any], bool, Callable[[], None] | None]) -> None:
        event_type, payload, error, fallback = item
        try:
            (self._notifier.error if error else self._notifier.info)({}, event_type, payload)
        except Exception:
            if fallback is not None:
                fallback()
            raise

    def stop(self) -> None:
        self.sender.stop()
        if self._started.is_set():
            self._server.stop()
            self._server.wait()
