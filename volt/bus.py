"""Volt's side of the control bus (docs/bus.rst): push parent changes to exactly the
affected node hosts, and count the nodes' notifications.

``VoltService`` computes the changes (``on_parents_changed``: ``{host: [entry, ...]}``, each
entry the heartbeat's ``{"peer_id", "parents"}``); ``ParentPusher`` casts them in its own
thread, so that neither the API nor the eviction loop ever waits on the broker.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from oslo_config import cfg

from brick import bus
from volt import validation
from volt.deathwatch import Report
from volt.errors import VoltError

LOG = logging.getLogger(__name__)


class ParentPusher:
    """Casts ``parents_changed`` to ``vmthunder-node.<host>`` for each host with changes."""

    def __init__(self, transport: Any) -> None:
        import oslo_messaging

        target = oslo_messaging.Target(topic=bus.NODE_TOPIC, version=bus.API_VERSION)
        self.client = oslo_messaging.get_rpc_client(transport, target, retry=bus.SEND_RETRY)
        self.health = bus.Health("volt-api parent push")
        self.sender = bus.Sender("volt-bus-push", self._cast, self.health)
        self.pushed: Counter[str] = Counter()  # host -> casts sent

    def push(self, changes: dict[str, list[dict[str, Any]]]) -> None:
        """Queue one cast per host (never blocks)."""
        for host, nodes in sorted(changes.items()):
            if nodes:
                self.sender.put((host, nodes))

    def _cast(self, item: tuple[str, list[dict[str, Any]]]) -> None:
        host, nodes = item
        self.client.prepare(server=host).cast({}, bus.PARENTS_CHANGED, host=host, nodes=nodes)
        self.pushed[host] += 1
        LOG.info(
            "pushed new parents of %s to %s", ", ".join(str(n["peer_id"]) for n in nodes), host
        )

    def stop(self) -> None:
        self.sender.stop()


GuestEvents = Callable[[str, str, Any], bool]  # (publisher, event type, payload) -> kept
DeadParent = Callable[[Report], str]  # volt.deathwatch.DeathWatch.report


def parse_dead_parent(publisher_id: str, payload: Any) -> Report:
    """The report of a ``vmthunder.parent.dead`` notification; ValueError unless its fields
    have the expected form and its publisher (``virtman.<host>``) is the host of the
    reporting peer (the broker's credentials are the boundary: a host may speak only for
    its own peers)."""
    if not isinstance(payload, dict):
        raise ValueError("payload is not an object")
    fields = [payload.get(k) for k in ("image", "peer_id", "parent", "host")]
    strings = [f for f in fields if isinstance(f, str) and f]
    if len(strings) != len(fields):
        raise ValueError("image, peer_id, parent and host must be non-empty strings")
    image, peer_id, parent, host = strings
    if publisher_id != f"virtman.{host}":
        raise ValueError(f"publisher {publisher_id!r} is not host {host!r}")
    try:
        reporter_host, reporter_image = validation.split_peer_id(peer_id)
        _, parent_image = validation.split_peer_id(parent, "parent")
        validation.volume_id(image)
    except VoltError as exc:
        raise ValueError(exc.detail) from None
    if reporter_host != validation.host(host) or reporter_image != image:
        raise ValueError(f"peer {peer_id!r} is not {host!r}'s node of {image!r}")
    if parent_image != image or parent == peer_id:
        raise ValueError(f"parent {parent!r} is not a parent in {image!r}")
    return Report(image, peer_id, parent, "bus")


class EventsEndpoint:
    """Notifications from the nodes: logged and counted (``volt_node_events``); the guest
    events go to ``on_guest`` (the cluster controller's ``node_event``) when set."""

    def __init__(self, metrics: Any | None = None) -> None:
        self.metrics = metrics
        self.counts: Counter[str] = Counter()
        self.on_guest: GuestEvents | None = None
        self.on_dead_parent: DeadParent | None = None
        self._lock = threading.Lock()

    def _record(self, level: int, publisher_id: str, event_type: str, payload: Any) -> None:
        if event_type not in bus.EVENTS:
            LOG.debug("ignoring bus event %s from %s", event_type, publisher_id)
            return
        with self._lock:
            self.counts[event_type] += 1
        if self.metrics is not None:
            self.metrics.node_events.labels(event_type).inc()
        LOG.log(level, "%s from %s: %s", event_type, publisher_id, payload)
        if event_type == bus.EVENT_PARENT_DEAD and self.on_dead_parent is not None:
            self._dead_parent(publisher_id, payload, self.on_dead_parent)
        if event_type in bus.GUEST_EVENTS and self.on_guest is not None:
            try:
                self.on_guest(publisher_id, event_type, payload)
            except Exception:  # a store hiccup loses an advisory event, never the listener
                LOG.exception("recording %s from %s", event_type, publisher_id)

    @staticmethod
    def _dead_parent(publisher_id: str, payload: Any, on_dead_parent: DeadParent) -> None:
        try:
            on_dead_parent(parse_dead_parent(publisher_id, payload))
        except ValueError as exc:
            LOG.warning("ignoring a parent death report from %s: %s", publisher_id, exc)
        except VoltError as exc:
            LOG.info("parent death report from %s refused: %s", publisher_id, exc.detail)
        except Exception:
            LOG.exception("handling a parent death report from %s", publisher_id)

    def info(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, md: Any) -> None:
        self._record(logging.INFO, publisher_id, event_type, payload)

    def error(self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, md: Any) -> None:
        self._record(logging.WARNING, publisher_id, event_type, payload)

    warn = error


class VoltBus:
    """Both directions, on one ``transport_url``."""

    def __init__(
        self,
        url: str,
        *,
        metrics: Any | None = None,
        conf: cfg.ConfigOpts | None = None,
        transports: tuple[Any, Any] | None = None,
    ) -> None:
        """``transports``: (RPC, notification) transports to use instead of ``url``'s (the
        unit tests share ``fake:/`` ones between both ends)."""
        import oslo_messaging

        conf = conf or cfg.CONF
        bus.quiet_reconnects()
        self.url = url
        rpc, notifications = transports or (
            bus.rpc_transport(conf, url),
            bus.notification_transport(conf, url),
        )
        self.rpc = rpc  # the cluster controller's dispatch shares it
        self.pusher = ParentPusher(rpc)
        self.events = EventsEndpoint(metrics)
        self._listening = threading.Event()
        self._listener = oslo_messaging.get_notification_listener(
            notifications,
            [oslo_messaging.Target(topic=bus.EVENTS_TOPIC)],
            [self.events],
            executor="threading",
            allow_requeue=False,
        )

    def start(self) -> VoltBus:
        # The listener connects (retrying while the broker is down) before its start
        # returns: in a thread of its own, so that volt-api never waits for the broker.
        threading.Thread(target=self._start_listener, name="volt-bus-events", daemon=True).start()
        LOG.info("control bus on %s: pushing parent changes", bus.safe_url(self.url))
        return self

    def _start_listener(self) -> None:
        try:
            self._listener.start()
        except Exception:
            LOG.exception("control bus: the events listener could not start")
            return
        self._listening.set()

    def push(self, changes: dict[str, list[dict[str, Any]]]) -> None:
        self.pusher.push(changes)

    def stop(self) -> None:
        self.pusher.stop()
        if self._listening.is_set():
            self._listener.stop()
            self._listener.wait()
