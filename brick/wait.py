"""Waiting for a state, with a deadline. The only module of the project that sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from brick.exception import Timeout

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.02,
    backoff: float = 1.5,
    max_interval_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """Call ``predicate`` until it returns something true, and return that.

    Raises ``Timeout(what, timeout_s)`` once ``timeout_s`` has passed. The predicate is
    always called at least once, and once more at the deadline. ``sleep`` may be a
    ``threading.Event.wait``, so that a stop wakes the wait (the predicate then raises).
    """
    deadline = clock() + timeout_s
    interval = interval_s
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - clock()
        if remaining <= 0:
            raise Timeout(what, timeout_s)
        sleep(min(interval, remaining))
        interval = min(interval * backoff, max_interval_s)


def pause(seconds: float) -> None:
    """A deliberate pause (retry back-off, a daemon's poll period); never a readiness wait."""
    time.sleep(seconds)
