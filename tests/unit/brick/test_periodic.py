"""brick.periodic: rounds until a stop, a failed round logged and the next one run, a stop
that waits a bounded time and says where a round hangs."""

from __future__ import annotations

import logging
import threading

import pytest

from brick.periodic import Periodic
from brick.wait import wait_until


def test_rounds_run_until_the_stop_and_a_failed_round_does_not_end_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds: list[int] = []

    def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 2:
            raise ValueError("round two fails")

    p = Periodic("test-rounds", 0.01, step)
    p.start()
    assert p.running
    wait_until(lambda: len(rounds) >= 4, timeout_s=10, what="four rounds")
    assert p.stop() is True and not p.running
    after = len(rounds)
    threading.Event().wait(0.1)  # ten intervals
    assert len(rounds) == after  # no round after the stop
    [failed] = [r for r in caplog.records if "a round failed" in r.getMessage()]
    assert failed.levelno == logging.ERROR and "test-rounds" in failed.getMessage()
    assert failed.exc_info is not None and "round two fails" in str(failed.exc_info[1])


def test_a_stopped_one_starts_again_and_start_twice_is_one_thread() -> None:
    rounds: list[str] = []
    p = Periodic("test-restart", 0.01, lambda: rounds.append(threading.current_thread().name))
    p.start()
    p.start()
    wait_until(lambda: rounds, timeout_s=10, what="a round")
    assert p.stop()
    before = len(rounds)
    p.start()
    wait_until(lambda: len(rounds) > before, timeout_s=10, what="a round after the restart")
    assert p.stop()
    assert set(rounds) == {"test-restart"}
    assert [t.name for t in threading.enumerate()].count("test-restart") == 0


def test_interval_zero_never_starts() -> None:
    p = Periodic("test-off", 0, lambda: pytest.fail("no round when off"))
    p.start()
    assert not p.running and p.stop() is True


def test_a_stop_that_times_out_logs_where_the_round_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered, release = threading.Event(), threading.Event()

    def stuck_in_a_daemon_call() -> None:
        entered.set()
        release.wait(30)

    p = Periodic("test-stuck", 0.01, stuck_in_a_daemon_call, join_timeout_s=0.2)
    p.start()
    assert entered.wait(10)
    with caplog.at_level(logging.WARNING, logger="brick.periodic"):
        assert p.stop() is False
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert "test-stuck: a round still runs 0.2 s after the stop" in text
    assert "stuck_in_a_daemon_call" in text and "release.wait(30)" in text
    release.set()
    wait_until(
        lambda: "test-stuck" not in [t.name for t in threading.enumerate()],
        timeout_s=10,
        what="the stuck round to end",
    )
