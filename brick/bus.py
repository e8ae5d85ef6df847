"""The control bus (oslo.messaging, RabbitMQ in production, ``fake:/`` in unit tests): what
Volt and virtman share. Layout and failure modes: docs/bus.rst.

- Volt → a node: RPC casts on topic ``NODE_TOPIC`` to server ``<host_ip>`` (the queue
  ``vmthunder-node.<host_ip>``: one per node host, so a message reaches exactly that host).
  Method ``parents_changed(host, nodes=[{"peer_id", "parents": [identity, ...]}])``: the
  same entries a heartbeat answer carries, for the host's nodes whose parents changed.
- the cluster controller → a node: RPC calls in namespace ``GUEST_NAMESPACE`` on the same
  per-host queue, method ``guest_call(host, verb, args)`` (one of the node's guest verbs,
  ``GUEST_METHODS``); the node's ``api_token`` travels in the request context.
- a node → Volt: notifications on topic ``EVENTS_TOPIC`` (publisher ``virtman.<host_ip>``),
  event types ``EVENT_*`` below.

The bus is optional and never in the way: every send goes through a ``Sender`` (a bounded
queue and one thread; a full queue drops and says so once), broker outages are logged once
each way by ``Health``, and the heartbeat stays the source of truth.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from oslo_config import cfg

LOG = logging.getLogger(__name__)

NODE_TOPIC = "vmthunder-node"
EVENTS_TOPIC = "vmthunder-events"
API_VERSION = "1.0"
PARENTS_CHANGED = "parents_changed"
EVENT_STACK_BUILT = "vmthunder.stack.built"
EVENT_STACK_FAILED = "vmthunder.stack.failed"
EVENT_STACK_DEGRADED = "vmthunder.stack.degraded"
EVENT_GUEST_PROGRESS = "vmthunder.guest.progress"
EVENT_GUEST_FAILED = "vmthunder.guest.failed"
GUEST_EVENTS = (EVENT_GUEST_PROGRESS, EVENT_GUEST_FAILED)
# A child's report that its parent stopped serving it: {image, peer_id, parent, host}.
EVENT_PARENT_DEAD = "vmthunder.parent.dead"
EVENTS = (
    EVENT_STACK_BUILT,
    EVENT_STACK_FAILED,
    EVENT_STACK_DEGRADED,
    *GUEST_EVENTS,
    EVENT_PARENT_DEAD,
)
GUEST_NAMESPACE = "guest"
GUEST_CALL = "guest_call"
# The guest verbs the controller may call over the bus (virtman.server.Methods): the
# idempotent create and deploy (a call the bus lost an answer of is sent again), the rest
# of the controller's verbs. Anything else is refused by the node.
GUEST_METHODS = frozenset(
    {
        "guest_create_once",
        "guest_deploy_once",
        "guest_action",
        "guest_power_state",
        "guest_delete",
    }
)
SEND_RETRY = 1  # attempts after the first: a send to a broker that is down fails fast
QUEUE_SIZE = 10000


TRANSPORT_URL_HELP = (
    "The control bus (docs/bus.rst): an oslo.messaging URL, e.g. "
    "rabbit://vmthunder:secret@10.0.0.5:5672/. Unset: no bus; parent changes travel with "
    "the heartbeats only. A broker that is down is retried in the background and never "
    "blocks the service."
)


def _oslo_transport_url() -> cfg.Opt:
    from oslo_messaging import opts

    for group, options in opts.list_opts():
        if group is None:
            for opt in options:
                if opt.name == "transport_url":
                    return opt
    raise RuntimeError("oslo.messaging lists no transport_url option")


def register_transport_url(conf: cfg.ConfigOpts) -> None:
    """Register oslo.messaging's own ``[DEFAULT] transport_url`` (an option of our own under
    that name would clash with it when oslo.messaging registers its own), with no default:
    oslo's default (``rabbit://``, a local broker) would turn the bus on for everybody."""
    conf.register_opts([_oslo_transport_url()])
    conf.set_default("transport_url", None)


def transport_url_sample_opt() -> cfg.Opt:
    """The option as our sample configurations document it (no default, our help)."""
    return cfg.StrOpt("transport_url", secret=True, help=TRANSPORT_URL_HELP)


def rpc_transport(conf: cfg.ConfigOpts, url: str) -> Any:
    import oslo_messaging

    return oslo_messaging.get_rpc_transport(conf, url=url)


def notification_transport(conf: cfg.ConfigOpts, url: str) -> Any:
    import oslo_messaging

    return oslo_messaging.get_notification_transport(conf, url=url)


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, where = rest.rpartition("@")
    user = creds.partition(":")[0]
    return f"{scheme}://{user}:***@{where}"


# oslo.messaging's rabbit driver logs an ERROR for every reconnection attempt while the
# broker is down (every 1-2 s, per connection). ``quiet_reconnects`` keeps the first of an
# outage and the reconnection, and drops the repeats: the outage is logged once.
_DRIVER_LOGGERS = ("oslo.messaging._drivers.impl_rabbit", "oslo_messaging._drivers.impl_rabbit")
_OUTAGE_MARKS = ("is unreachable", "Unable to connect", "Failed to publish", "Connection failed")
_RECOVERY_MARKS = ("Reconnected to AMQP", "Connected to AMQP")


class _OutageFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.in_outage = False
        self.dropped = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        with self._lock:
            if any(mark in message for mark in _RECOVERY_MARKS):
                was, self.in_outage = self.in_outage, False
                if was and self.dropped:
                    record.msg = f"{record.msg} (after {self.dropped} failed attempts not logged)"
                self.dropped = 0
                return True
            if any(mark in message for mark in _OUTAGE_MARKS):
                if self.in_outage:
                    self.dropped += 1
                    return False
                self.in_outage = True
        return True


_filter = _OutageFilter()


def quiet_reconnects() -> None:
    """Install the outage filter on the rabbit driver's loggers (idempotent)."""
    for name in _DRIVER_LOGGERS:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)


class Health:
    """Whether the bus worked last time; a change is logged once (WARNING down, INFO up)."""

    def __init__(self, what: str, fallback: str = "parent changes travel with heartbeats") -> None:
        self.what = what
        self.fallback = fallback
        self.down = False
        self.failures = 0
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            if self.down:
                return
            self.down = True
        LOG.warning(
            "%s: the bus is unreachable (%s); %s until it returns", self.what, exc, self.fallback
        )

    def worked(self) -> None:
        with self._lock:
            if not self.down:
                return
            self.down = False
        LOG.warning("%s: the bus works again", self.what)


class Sender:
    """Runs ``send(item)`` for each queued item in one background thread: callers never
    wait on the broker. A failed send is counted in ``health`` and dropped (the heartbeat
    carries the same facts); a full queue drops the item."""

    def __init__(self, name: str, send: Callable[[Any], None], health: Health) -> None:
        self.name = name
        self._send = send
        self.health = health
        self.sent = 0
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                LOG.warning("%s: send queue full; dropping (heartbeats still carry it)", self.name)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._send(item)
            except Exception as exc:
                self.dropped += 1
                self.health.failed(exc)
            else:
                self.sent += 1
                self.health.worked()
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (tests) until every queued item was handled; True if done in time."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)


_STOP = object()
