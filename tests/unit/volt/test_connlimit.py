"""volt-api's connection capacity: the open-file limit raised to fit max_connections."""

from __future__ import annotations

import logging
import resource

import pytest

from volt.connlimit import FD_MARGIN, fit_open_files

INF = resource.RLIM_INFINITY


class Limits:
    """A fake RLIMIT_NOFILE: what was read and set."""

    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard
        self.set_calls: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.set_calls.append(limits)
        self.soft, self.hard = limits


def fit(wanted: int, limits: Limits) -> int:
    return fit_open_files(wanted, getrlimit=limits.get, setrlimit=limits.set)


def test_the_soft_limit_is_raised_to_fit_every_connection():
    limits = Limits(1024, 65536)
    assert fit(16384, limits) == 16384
    assert limits.set_calls == [(16384 + FD_MARGIN, 65536)]  # the hard limit untouched


@pytest.mark.parametrize("soft", [16384 + FD_MARGIN, 100_000, INF])
def test_a_soft_limit_that_fits_is_left_alone(soft):
    limits = Limits(soft, INF)
    assert fit(16384, limits) == 16384
    assert limits.set_calls == []


def test_an_unlimited_hard_limit_gives_exactly_what_is_needed():
    limits = Limits(1024, INF)
    assert fit(10000, limits) == 10000
    assert limits.set_calls == [(10000 + FD_MARGIN, INF)]


def test_a_low_hard_limit_serves_fewer_connections_and_says_what_to_raise(caplog):
    limits = Limits(1024, 4096)
    with caplog.at_level(logging.WARNING, logger="volt.connlimit"):
        served = fit(16384, limits)
    assert served == 4096 - FD_MARGIN  # accepting more would fail for lack of files
    assert limits.set_calls == [(4096, 4096)]
    [warning] = [r.getMessage() for r in caplog.records]
    assert "max_connections = 16384" in warning and "hard limit is 4096" in warning
    assert f"at most {served} connections" in warning and "LimitNOFILE" in warning


def test_nonsense_is_refused_before_any_limit_changes():
    limits = Limits(1024, 4096)
    with pytest.raises(ValueError, match="max_connections must be at least 1, not 0"):
        fit(0, limits)
    assert limits.set_calls == []
