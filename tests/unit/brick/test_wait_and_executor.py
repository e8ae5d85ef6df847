"""wait_until with a fake clock; execute() against real commands (no shell)."""

import pytest

from brick.exception import CommandFailed, Timeout
from brick.executor import execute
from brick.wait import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_until_returns_the_first_true_value() -> None:
    answers = iter([None, 0, "ready"])
    clock = FakeClock()
    assert (
        wait_until(lambda: next(answers), timeout_s=5, what="x", clock=clock, sleep=clock.sleep)
        == "ready"
    )
    assert clock.sleeps == [0.02, 0.03]


def test_wait_until_raises_timeout_naming_what_it_waited_for() -> None:
    clock = FakeClock()
    with pytest.raises(Timeout) as err:
        wait_until(lambda: False, timeout_s=1.0, what="the relay", clock=clock, sleep=clock.sleep)
    assert str(err.value) == "timed out after 1 s waiting for the relay"
    assert clock.now == pytest.approx(1.0)
    assert max(clock.sleeps) <= 0.5


def test_execute_returns_output_and_never_uses_a_shell() -> None:
    result = execute(["printf", "%s", "a; rm -rf /"])
    assert result.stdout == "a; rm -rf /"
    assert result.exit_code == 0


def test_execute_raises_with_exit_code_and_stderr_tail() -> None:
    with pytest.raises(CommandFailed) as err:
        execute(["ls", "/nonexistent-vmt-path"])
    assert err.value.exit_code == 2
    assert "nonexistent-vmt-path" in str(err.value)


def test_execute_accepts_listed_exit_codes() -> None:
    assert execute(["false"], check_exit_code=[0, 1]).exit_code == 1


def test_execute_times_out() -> None:
    with pytest.raises(Timeout):
        execute(["sleep", "5"], timeout_s=0.2)


def test_execute_refuses_a_string() -> None:
    with pytest.raises(TypeError):
        execute("ls -l")  # type: ignore[arg-type]
