"""How many client connections volt-api serves at once, and the open files that takes.

Every compute node keeps one keep-alive connection to volt-api (its session's heartbeat,
every ``heartbeat_interval``, comes before Granian's 30 s idle timeout closes it), so the
connections held at once grow with the fleet. Granian serves at most ``backpressure``
connections per worker and leaves the others unanswered in the listen backlog: with its
default (backlog / workers = 4,096 here) the nodes past the 4,096th that hold a connection
got no answer at all. ``max_connections`` sets it, and volt-api raises its soft open-file
limit to fit before the worker starts (the worker inherits it).
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable

LOG = logging.getLogger(__name__)
FD_MARGIN = 256  # listening socket, store, logs, pipes: files that are not connections

GetLimit = Callable[[int], tuple[int, int]]
SetLimit = Callable[[int, tuple[int, int]], None]


def raise_open_files(
    needed: int,
    *,
    getrlimit: GetLimit = resource.getrlimit,
    setrlimit: SetLimit = resource.setrlimit,
) -> tuple[int, int]:
    """Raise the soft open-file limit towards ``needed`` (never past the hard limit, never
    down); returns (soft, hard) after, either possibly ``RLIM_INFINITY``."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        if target > soft:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            LOG.info("open-file limit %d -> %d", soft, target)
            soft = target
    return soft, hard


def fit_open_files(
    wanted: int,
    *,
    getrlimit: GetLimit = resource.getrlimit,
    setrlimit: SetLimit = resource.setrlimit,
) -> int:
    """Raise the soft open-file limit so that ``wanted`` connections fit; returns how many
    connections do fit (``wanted``, or fewer when the hard limit is lower: logged, naming
    the option and the limit to raise)."""
    if wanted < 1:
        raise ValueError(f"max_connections must be at least 1, not {wanted}")
    needed = wanted + FD_MARGIN
    soft, hard = raise_open_files(needed, getrlimit=getrlimit, setrlimit=setrlimit)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fits = max(1, soft - FD_MARGIN)
    LOG.warning(
        "max_connections = %d needs %d open files, but the hard limit is %d: volt-api serves "
        "at most %d connections at once (each compute node holds one); raise the hard limit "
        "(LimitNOFILE= of the service, ulimit -Hn)",
        wanted,
        needed,
        hard,
        fits,
    )
    return fits
