"""Every node's capacity (its ``guest_host_info``), asked in the background.

Placement reads this cache, so ``POST /v1/clusters`` never waits on a node: one thread per
node asks every ``interval`` seconds (a node that hangs delays only its own entry). An entry
is *down* when the node's last answer was a failure, *unknown* before its first answer, and
*stale* when its last answer is older than ``2 * interval + INFO_TIMEOUT_S`` (its thread is
stuck on a node that neither answers nor fails). Placement uses only nodes up and fresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from volt.cluster.nodes import INFO_TIMEOUT_S, NodeEndpoint

LOG = logging.getLogger(__name__)

Ask = Callable[[NodeEndpoint], dict[str, Any]]


@dataclass(frozen=True)
class Probe:
    """A node's last answer: its host info, or the error it failed with."""

    info: dict[str, Any] | None
    error: str | None
    at: float  # time.monotonic() of the answer


class CapacityCache:
    def __init__(
        self,
        nodes: Sequence[NodeEndpoint],
        ask: Ask,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nodes = list(nodes)
        self.ask = ask
        self.interval = interval
        self.clock = clock
        self._probes: dict[str, Probe] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> CapacityCache:
        for node in self.nodes:
            thread = threading.Thread(
                target=self._loop, args=(node,), name=f"capacity-{node.id}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop asking; a thread inside a call ends when the call does (daemon)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=0.1)

    def refresh(self, node: NodeEndpoint) -> Probe:
        """Ask one node now and record its answer."""
        try:
            info = self.ask(node)
            if not isinstance(info, dict):
                raise TypeError(f"guest_host_info returned {type(info).__name__}")
            probe = Probe(info, None, self.clock())
        except Exception as exc:  # any failure: the node is down for placement
            previous = self.get(node.id)
            if previous is None or previous.error is None:
                LOG.warning("cluster: node %s does not answer guest_host_info: %s", node.id, exc)
            probe = Probe(None, str(exc) or type(exc).__name__, self.clock())
        with self._lock:
            self._probes[node.id] = probe
        return probe

    def refresh_all(self) -> None:
        """Ask every node now, one after the other (tests, and nothing on a request path)."""
        for node in self.nodes:
            self.refresh(node)

    def get(self, node_id: str) -> Probe | None:
        with self._lock:
            return self._probes.get(node_id)

    def stale(self, probe: Probe) -> bool:
        return self.clock() - probe.at > 2 * self.interval + INFO_TIMEOUT_S

    def _loop(self, node: NodeEndpoint) -> None:
        while not self._stop.is_set():
            self.refresh(node)
            self._stop.wait(self.interval)
