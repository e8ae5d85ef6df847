"""Exponential backoff of a retried repair (a degraded image's)."""

from __future__ import annotations

import time
from collections.abc import Callable


class Backoff:
    """After the n-th failure in a row the next try is due ``minimum * 2**(n-1)`` seconds
    later, capped at ``maximum``; a success starts over."""

    def __init__(
        self, minimum: float, maximum: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError(f"backoff needs 0 < minimum <= maximum, not {minimum}, {maximum}")
        self.minimum = minimum
        self.maximum = maximum
        self.clock = clock
        self.failures = 0
        self.next_at: float | None = None  # None: nothing to retry

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (``failures`` >= 1)."""
        exponent = min(failures - 1, 64)  # 2**64 * minimum is far past any maximum
        return min(self.minimum * 2**exponent, self.maximum)

    def failed(self) -> float:
        """Count a failure; returns the delay until the next try."""
        self.failures += 1
        wait = self.delay(self.failures)
        self.next_at = self.clock() + wait
        return wait

    def reset(self) -> None:
        self.failures = 0
        self.next_at = None

    def remaining(self) -> float | None:
        """Seconds until the next try is due (0 if due now), None if none is pending."""
        if self.next_at is None:
            return None
        return max(0.0, self.next_at - self.clock())
