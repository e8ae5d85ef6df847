"""A step run every ``interval_s`` in a daemon thread until stopped: the node's supervisor,
its watches and monitors, Volt's bus prober. A step that raises is logged and the next
round runs. ``stop`` waits a bounded time for the round in progress; a thread still in it
then is logged with its stack, so that a slow shutdown says where it waits."""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable

LOG = logging.getLogger(__name__)


class Periodic:
    def __init__(
        self,
        name: str,
        interval_s: float,
        step: Callable[[], object],
        *,
        join_timeout_s: float = 5.0,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.step = step
        self.join_timeout_s = join_timeout_s
        self.stopping = threading.Event()  # set by stop(): a step may wait on it
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the rounds (the first after ``interval_s``); nothing if ``interval_s`` is
        0 or they run already. A stopped one may start again."""
        if self.interval_s <= 0 or self._thread is not None:
            return
        self.stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """No more rounds; wait up to ``join_timeout_s`` for the one in progress. False
        (and a WARNING with the thread's stack) if it still runs: it ends on its own."""
        self.stopping.set()
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(self.join_timeout_s)
        if not thread.is_alive():
            return True
        frame = sys._current_frames().get(thread.ident or 0)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(gone)\n"
        LOG.warning(
            "%s: a round still runs %g s after the stop; left to end on its own, at:\n%s",
            self.name,
            self.join_timeout_s,
            stack.rstrip("\n"),
        )
        return False

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.step()
            except Exception:
                LOG.exception("%s: a round failed; the next in %g s", self.name, self.interval_s)
