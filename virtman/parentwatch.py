"""Notice that a parent stopped serving this node, and tell Volt (docs/bus.rst, "Detecting
a dead parent").

Two signals, every ``interval_s``:

* the driver's failing reads (``failed_paths``: the qemu driver's quorum reports, the dm
  driver's failed multipath paths), for any parent of an image;
* a TCP connect to the port the first path reads from (``timeout_s``): an idle image,
  which reads nothing, notices its parent's death too. One connect per image and round.

A parent seen failing is reported (``report``, with the attempt's number: the first goes
over the bus when it is up, the next ones over the REST API), again after ``retry_s`` while
it is still this image's parent (a bus that looked up may have lost the first: a broker
that stopped does not always fail the send), then every ``repeat_s``: Volt checks each
report itself, and one that found the parent alive is not lost for good.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from brick import values
from brick.net import accepts
from brick.periodic import Periodic
from virtman.layers.base import Endpoint

LOG = logging.getLogger(__name__)

INTERVAL_S = 0.5
CONNECT_TIMEOUT_S = 0.3
RETRY_S = 1.0
REPEAT_S = 5.0


@dataclass(frozen=True)
class Watched:
    """One image this node reads from parents: its peer id and paths in read order."""

    image: str
    peer_id: str
    paths: tuple[Endpoint, ...]


def address(endpoint: Endpoint) -> tuple[str, int]:
    """The (host, port) the path reads from: its NBD export if it has one, else iSCSI."""
    portal = values.Portal.parse(endpoint.nbd or endpoint.portal, names=True)
    return portal.host, portal.port


# (image, this node's peer id, dead parent, attempt: 0 for the first report of it)
Report = Callable[[str, str, str, int], None]


class ParentWatch:
    def __init__(
        self,
        watched: Callable[[], list[Watched]],
        failed_paths: Callable[[str], list[Endpoint]],
        report: Report,
        *,
        probe: Callable[[str, int, float], bool] = accepts,
        interval_s: float = INTERVAL_S,
        timeout_s: float = CONNECT_TIMEOUT_S,
        retry_s: float = RETRY_S,
        repeat_s: float = REPEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watched = watched
        self.failed_paths = failed_paths
        self.report = report
        self.probe = probe
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.repeat_s = repeat_s
        self.clock = clock
        # (image, parent) -> (when last reported, reports so far)
        self.reported: dict[tuple[str, str], tuple[float, int]] = {}
        self._rounds = Periodic("parent-watch", interval_s, self.check)

    def start(self) -> ParentWatch:
        self._rounds.start()
        return self

    def stop(self) -> None:
        self._rounds.stop()

    def check(self) -> list[tuple[str, str]]:
        """One round; returns the (image, parent) pairs reported in it."""
        now = self.clock()
        done = []
        current: set[tuple[str, str]] = set()
        for w in self.watched():
            dead = {e.peer_id: why for e, why in self._failing(w) if e.peer_id is not None}
            current.update((w.image, p.peer_id) for p in w.paths if p.peer_id)
            for parent, why in sorted(dead.items()):
                last, attempt = self.reported.get((w.image, parent), (None, 0))
                wait = self.retry_s if attempt == 1 else self.repeat_s
                if last is not None and now - last < wait:
                    continue
                self.reported[(w.image, parent)] = (now, attempt + 1)
                LOG.warning("%s: parent %s stopped serving this node (%s)", w.image, parent, why)
                try:
                    self.report(w.image, w.peer_id, parent, attempt)
                except Exception as exc:  # the heartbeat and Volt's node_timeout remain
                    LOG.warning("%s: could not report parent %s: %s", w.image, parent, exc)
                done.append((w.image, parent))
        # forget parents this node no longer reads from: a parent that comes back and
        # dies again is reported at once
        self.reported = {k: t for k, t in self.reported.items() if k in current}
        return done

    def _failing(self, w: Watched) -> list[tuple[Endpoint, str]]:
        failing = [(e, "its reads failed") for e in self.failed_paths(w.image)]
        first = w.paths[0] if w.paths else None
        if first is not None and first.peer_id is not None:
            host, port = address(first)
            if not self.probe(host, port, self.timeout_s):
                failing.append((first, f"{host}:{port} refused or did not answer"))
        return failing
