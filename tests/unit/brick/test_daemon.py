"""brick/daemon.py: the one supervisor (pidfile, is-it-ours, start-and-wait, SIGTERM then
SIGKILL, adopt), on small real processes (``sleep``) that the tests start and end."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from brick import daemon as d
from brick.exception import CommandFailed, Conflict, Timeout

MARK = "61.25"  # a sleep argument nobody else uses: the argv check looks for it


def sleeper(argv: Sequence[str]) -> bool:
    return os.path.basename(argv[0]) == "sleep" and MARK in argv


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[d.Supervisor]:
    supervisor = d.Supervisor("sleeper", tmp_path / "sleeper.pid", sleeper)
    yield supervisor
    supervisor.stop(timeout_s=1.0)


def test_spawn_stop_and_the_pidfile(sup: d.Supervisor, tmp_path: Path) -> None:
    pid = sup.spawn(["sleep", MARK], log=tmp_path / "s.log", ready=sup.alive, timeout_s=5)
    assert sup.pidfile.path.read_text() == f"{pid}\n"
    assert sup.pidfile.read() == (pid, None)
    assert sup.is_ours(pid) and sup.alive() and sup.find() == pid
    started = d.start_time(pid)
    assert started is not None and sup.started == started
    assert not sup.is_ours(pid, started + 1)  # a reused PID starts later
    assert sup.in_netns(pid)
    assert sup.stop(timeout_s=5) == pid
    assert not sup.pidfile.path.exists() and sup.pid is None
    assert d.start_time(pid) is None or not sleeper(d.proc.cmdline(pid))
    assert sup.stop() is None  # idempotent


def test_sigkill_after_the_bound_when_sigterm_is_ignored(sup: d.Supervisor, tmp_path: Path) -> None:
    argv = ["sh", "-c", f'trap "" TERM; exec sleep {MARK}']
    pid = sup.spawn(argv, log=tmp_path / "s.log", ready=sup.alive, timeout_s=5)
    assert sup.stop(timeout_s=0.2, kill_timeout_s=5) == pid
    assert sup.child is None and not sup.alive()


def test_a_graceful_request_replaces_sigterm(sup: d.Supervisor, tmp_path: Path) -> None:
    argv = ["sh", "-c", f'trap "" TERM; exec sleep {MARK}']
    sup.spawn(argv, log=tmp_path / "s.log", ready=sup.alive, timeout_s=5)
    asked: list[int] = []

    def graceful(pid: int) -> None:
        asked.append(pid)
        os.kill(pid, 9)  # "tgtadm --op delete --mode system", here

    pid = sup.stop(timeout_s=5, graceful=graceful)
    assert asked == [pid]


def test_an_early_exit_fails_the_start_with_the_log(sup: d.Supervisor, tmp_path: Path) -> None:
    argv = ["sh", "-c", "echo cannot bind portal; exit 3"]
    with pytest.raises(CommandFailed, match="cannot bind portal") as err:
        sup.spawn(argv, log=tmp_path / "s.log", ready=lambda: False, timeout_s=5)
    assert err.value.exit_code == 3
    assert not sup.pidfile.path.exists() and sup.pid is None


def test_not_ready_in_time_is_stopped_again(sup: d.Supervisor, tmp_path: Path) -> None:
    with pytest.raises(Timeout, match="sleeper to be ready"):
        sup.spawn(["sleep", MARK], log=tmp_path / "s.log", ready=lambda: False, timeout_s=0.2)
    assert sup.pid is None and sup.child is None and not sup.pidfile.path.exists()


def test_a_missing_program_is_a_command_failure(sup: d.Supervisor, tmp_path: Path) -> None:
    with pytest.raises(CommandFailed) as err:
        sup.spawn(["/nonexistent/tgtd"], log=tmp_path / "s.log", ready=lambda: True, timeout_s=1)
    assert err.value.exit_code == 127


def test_a_restarted_owner_adopts(sup: d.Supervisor, tmp_path: Path) -> None:
    pid = sup.spawn(["sleep", MARK], log=tmp_path / "s.log", ready=sup.alive, timeout_s=5)
    again = d.Supervisor("sleeper", sup.pidfile.path, sleeper)
    seen: list[tuple[int, list[str]]] = []
    assert again.adopt(lambda p, argv: seen.append((p, list(argv)))) == pid
    assert seen == [(pid, ["sleep", MARK])]
    assert again.started == d.start_time(pid)

    def refuse(p: int, argv: Sequence[str]) -> None:
        raise Conflict("sleeper", str(p), "other arguments")

    with pytest.raises(Conflict):
        d.Supervisor("sleeper", sup.pidfile.path, sleeper).adopt(refuse)
    assert again.stop(timeout_s=5) == pid


def test_a_stale_pidfile_is_removed_and_nothing_is_signalled(tmp_path: Path) -> None:
    pidfile = tmp_path / "x.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # a live process, but not a sleeper
    sup = d.Supervisor("sleeper", pidfile, sleeper)
    assert sup.find() is None
    assert sup.stop() is None  # we are still here
    pidfile.write_text(f"{os.getpid()}\n")
    assert sup.adopt() is None and not pidfile.exists()


@pytest.mark.parametrize("text", ["", "x\n", "-1\n", "\u0663\n"])
def test_unreadable_pidfiles(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.pid"
    path.write_text(text)
    assert d.Pidfile(path).read() is None
    assert d.Pidfile(tmp_path / "missing.pid").read() is None


def test_a_named_netns_that_does_not_exist(tmp_path: Path) -> None:
    sup = d.Supervisor("sleeper", tmp_path / "x.pid", sleeper, netns="vmtb-no-such-netns")
    with pytest.raises(d.NotFound):
        sup.check_netns()


def test_start_time_of_a_process_that_is_gone() -> None:
    assert d.start_time(0) is None
    assert d.start_time(os.getpid()) is not None
    assert d.process_netns(os.getpid()) == d.netns_identity(None)
