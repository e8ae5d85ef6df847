"""The cluster controller's guest verbs over the control bus, XML-RPC when it is down.

With a ``transport_url``, ``BusDispatch.client(node, host)`` answers each of the
controller's guest verbs (``brick.bus.GUEST_METHODS``) by an RPC call to the node's own
queue (``vmthunder-node.<host>``, namespace ``guest``, the node's api_token in the context;
``host`` is the node's host_ip as its host info says), and
everything else, or any verb while the bus is unusable, by the node's XML-RPC API: the
same verbs, the same token. Only idempotent verbs travel (create and deploy ``_once``, the
power verbs), so a call sent twice never makes a second guest:

- the broker refuses the publish (down): the call goes over XML-RPC at once, the outage is
  logged once (``brick.bus.Health``) and a probe looks for the broker every second;
- the broker goes down while a call waits for its answer (the probe sees it): the wait is
  abandoned and the call sent again over XML-RPC; the node's per-userid lock makes that
  copy wait for the first and answer its result;
- no answer in ``call_timeout`` (the message was lost, or the node does not listen on the
  bus): sent again over XML-RPC, and that node gets XML-RPC for ``SILENT_S`` seconds.

The bus is used again ``RECOVERY_GRACE_S`` after the probe found the broker back: the
nodes' listeners need that long to declare their queues again (a call published before
would be lost, and cost ``call_timeout``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from brick import bus
from brick.periodic import Periodic
from volt.cluster.nodes import NodeEndpoint

LOG = logging.getLogger(__name__)
PROBE_TOPIC = "vmthunder-probe"  # no queue is bound: a probe's cast is dropped by the broker
PROBE_INTERVAL_S = 1.0
RECOVERY_GRACE_S = 3.0
SILENT_S = 60.0
WATCH_S = 0.2  # how often a waiting call looks at the bus's health


class BusUnusable(Exception):
    """The call did not get its answer over the bus: send it over XML-RPC."""


class BusDispatch:
    def __init__(
        self,
        transport: Any,
        *,
        call_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import oslo_messaging

        target = oslo_messaging.Target(
            topic=bus.NODE_TOPIC, namespace=bus.GUEST_NAMESPACE, version=bus.API_VERSION
        )
        self._rpc = oslo_messaging.get_rpc_client(transport, target, retry=bus.SEND_RETRY)
        probe_target = oslo_messaging.Target(topic=PROBE_TOPIC, version=bus.API_VERSION)
        self._probe = oslo_messaging.get_rpc_client(transport, probe_target, retry=0)
        self.call_timeout = call_timeout
        self.clock = clock
        self.health = bus.Health("cluster dispatch", "guest verbs go over XML-RPC")
        self.answered: Counter[str] = Counter()  # "bus" / "xmlrpc": calls answered over it
        self._usable_at = 0.0  # clock() from which the bus is used (after a recovery)
        self._silent: dict[str, float] = {}  # node id -> clock() until which it gets XML-RPC
        self._in_flight = 0
        self._lock = threading.Lock()
        self._prober = Periodic("cluster-bus-probe", PROBE_INTERVAL_S, self._probe_round)
        self._prober.start()

    def close(self) -> None:
        self._prober.stop()

    def client(self, node: NodeEndpoint, host: str, timeout: float, xmlrpc: Any) -> NodeClient:
        """The node's client: over the bus (to the queue of ``host``, the node's host_ip)
        when it is usable, else ``xmlrpc`` (the node's virtmanclient, or a stand-in)."""
        return NodeClient(self, node, host, timeout, xmlrpc)

    # -- health ---------------------------------------------------------------------------------
    def usable(self, node_id: str) -> bool:
        now = self.clock()
        with self._lock:
            return (
                not self.health.down
                and now >= self._usable_at
                and now >= self._silent.get(node_id, 0.0)
            )

    def _probe_round(self) -> None:
        """While calls wait or the bus is down: a cast every PROBE_INTERVAL_S."""
        with self._lock:
            needed = self._in_flight > 0 or self.health.down
        if needed:
            self.probe()

    def probe(self) -> bool:
        """Whether the broker takes a message now (logged once per change)."""
        try:
            self._probe.cast({}, "probe")
        except Exception as exc:
            self.health.failed(exc)
            return False
        with self._lock:
            if self.health.down:
                self._usable_at = self.clock() + RECOVERY_GRACE_S
        self.health.worked()
        return True

    # -- one call -------------------------------------------------------------------------------
    def call(
        self, node: NodeEndpoint, host: str, method: str, args: list[Any], timeout: float
    ) -> Any:
        """The node's answer over the bus; ``BusUnusable`` if it did not come (the call may
        or may not have run: only idempotent verbs come here); the node's own error (an
        ``oslo_messaging.RemoteError``) as it is."""
        import oslo_messaging

        wait_s = min(timeout, self.call_timeout)
        client = self._rpc.prepare(server=host, timeout=wait_s)
        context = {"token": node.token} if node.token else {}
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                outcome["result"] = client.call(
                    context, bus.GUEST_CALL, host=host, verb=method, args=args
                )
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                done.set()

        with self._lock:
            self._in_flight += 1
        try:
            threading.Thread(target=run, name=f"bus-call-{node.id}", daemon=True).start()
            while not done.wait(WATCH_S):
                if self.health.down:
                    raise BusUnusable(f"the bus went down while {method} waited on {node.id}")
        finally:
            with self._lock:
                self._in_flight -= 1
        error = outcome.get("error")
        if error is None:
            self.health.worked()
            return outcome.get("result")
        if isinstance(error, oslo_messaging.MessagingTimeout):
            with self._lock:
                self._silent[node.id] = self.clock() + SILENT_S
            LOG.warning(
                "cluster dispatch: no answer from %s over the bus in %.0f s (%s); "
                "XML-RPC for it for %.0f s",
                node.id,
                wait_s,
                method,
                SILENT_S,
            )
            raise BusUnusable(f"{method} on {node.id}: no answer in {wait_s:.0f} s")
        if isinstance(error, oslo_messaging.RemoteError) or not isinstance(
            error, oslo_messaging.MessagingException | OSError
        ):
            raise error  # the node ran (or refused) the verb: its answer; or a bug here
        self.health.failed(error)  # could not publish: the broker is down
        raise BusUnusable(f"{method} on {node.id}: {error}")


class NodeClient:
    """``call(method, *args)`` like ``virtmanclient.Client``; ``via`` says how the last
    call was answered ("bus" or "xmlrpc")."""

    def __init__(
        self, dispatch: BusDispatch, node: NodeEndpoint, host: str, timeout: float, xmlrpc: Any
    ) -> None:
        self.dispatch = dispatch
        self.node = node
        self.host = host
        self.timeout = timeout
        self.xmlrpc = xmlrpc
        self.via = ""

    def call(self, method: str, *args: Any) -> Any:
        if method in bus.GUEST_METHODS and self.dispatch.usable(self.node.id):
            try:
                result = self.dispatch.call(self.node, self.host, method, list(args), self.timeout)
            except BusUnusable as exc:
                LOG.info("cluster dispatch: %s; sent over XML-RPC", exc)
            else:
                self._answered("bus")
                return result
        result = self.xmlrpc.call(method, *args)
        self._answered("xmlrpc")
        return result

    def _answered(self, via: str) -> None:
        self.via = via
        self.dispatch.answered[via] += 1
