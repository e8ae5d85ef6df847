"""A heartbeat's ``bytes_read``: what each node of this host read from each of its sources.

The counters are the driver's (``UpstreamLayer.read_counters``: per path, since it was
connected); paths to image servers add up under source None, a parent's under its peer id.
Volt shows them on its status page; nothing else depends on them, so a path whose counter
cannot be read is left out rather than failing the heartbeat.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from brick.exception import BrickError
from virtman.baseimage import BaseImage, Status
from virtman.layers.base import Driver

LOG = logging.getLogger(__name__)
# Entries per heartbeat: about 25 KiB of JSON, well inside volt-api's 64 KiB body limit, so
# that a host with very many images never turns its liveness heartbeat into a 413.
MAX_ENTRIES = 256


def collect(driver: Driver, images: Iterable[BaseImage]) -> list[dict[str, Any]]:
    """``[{"peer_id", "source", "bytes"}]`` for the nodes in a tree (not local images)."""
    report = []
    for base in images:
        if base.local or base.peer_id is None or base.status != Status.OK:
            continue
        try:
            counters = driver.upstream.read_counters(base.name)
        except (BrickError, OSError) as exc:
            LOG.debug("%s: read counters unavailable: %s", base.name, exc)
            continue
        by_source: dict[str | None, int] = {}
        for endpoint, count in counters.items():
            by_source[endpoint.peer_id] = by_source.get(endpoint.peer_id, 0) + count
        report += [
            {"peer_id": base.peer_id, "source": source, "bytes": count}
            for source, count in by_source.items()
        ]
    if len(report) > MAX_ENTRIES:
        LOG.debug("read counters of %d paths: only the first %d sent", len(report), MAX_ENTRIES)
    return report[:MAX_ENTRIES]
