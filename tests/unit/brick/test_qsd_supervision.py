"""brick.qsd's process handling through brick.daemon.Supervisor, on a stand-in for
qemu-storage-daemon: a script on PATH (tests/unit/fakes/qmp.py) that "daemonizes" a Python
process whose argv[0] is ``qemu-storage-daemon`` (with our command line) and writes its PID
to ``--pidfile``, as the real daemon does. It serves no QMP, so starting it times out on the
QMP connect, which stops it again. (The real daemon: tests/functional/test_brick_qsd.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from brick import daemon as d
from brick.exception import NotFound, Timeout
from brick.qsd.daemon import BINARY, StorageDaemon
from tests.unit.fakes.qmp import stand_in


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    for key, value in stand_in(bin_dir, None).items():
        monkeypatch.setenv(key, value)
    return bin_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    # whatever a failed test left: end it by the PID in its pidfile, if it is a stand-in
    found = d.Pidfile(path / "q.pid").read()
    if found is not None and StorageDaemon("q", path)._is_ours(found[0]):
        os.kill(found[0], signal.SIGKILL)


# start()'s bound: long enough for the fake daemon to daemonize on a loaded machine (0.5 s
# was not: under a load of 14 the daemonizing command itself timed out), so the timeout
# that ends the start is the QMP socket's.
START_S = 2.0


def test_start_goes_through_the_supervisor_and_a_failed_connect_stops_it(
    fake_bin: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = StorageDaemon("q", run_dir, malloc_mmap_threshold_kib=32768)
    seen: list[int] = []
    daemonize = daemon._supervisor.daemonize

    def spy(
        argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float = 30.0
    ) -> int:
        assert timeout_s == START_S  # start's bound reaches the daemonizing command
        pid = daemonize(argv, env=env, timeout_s=timeout_s)
        assert daemon._is_ours(pid) and daemon.pid == pid and daemon.running()
        assert daemon._supervisor.started == d.start_time(pid)
        assert daemon.pidfile.read_text() == f"{pid}\n"  # the daemon's own pidfile format
        seen.append(pid)
        return pid

    monkeypatch.setattr(daemon._supervisor, "daemonize", spy)
    with pytest.raises(Timeout, match="QMP socket"):
        daemon.start(timeout_s=START_S)
    assert len(seen) == 1
    # the malloc threshold reached the daemon's environment (bytes)
    assert (run_dir / "env.txt").read_text().strip() == str(32768 * 1024)
    assert not daemon._is_ours(seen[0])  # stopped again, by PID
    assert daemon.pid is None and not daemon.pidfile.exists() and not daemon.qmp_path.exists()


def test_a_restarted_owner_adopts_from_the_pidfile_and_stops(fake_bin: Path, run_dir: Path) -> None:
    first = StorageDaemon("q", run_dir)
    run_dir.mkdir()
    subprocess.run(first.argv(), check=True, timeout=30)  # an earlier owner started it
    found = first._supervisor.pidfile.read()
    assert found is not None
    pid = found[0]
    assert (run_dir / "env.txt").read_text().strip() == "unset"  # no threshold asked for

    again = StorageDaemon("q", run_dir)
    with pytest.raises(Timeout):  # ours, but it serves no QMP
        again.adopt(timeout_s=0.3)
    assert again._supervisor.pid == pid
    assert again._supervisor.started == d.start_time(pid)
    assert again.pid == pid
    again.stop(timeout_s=5)
    assert not again._is_ours(pid) and not again.pidfile.exists()
    again.stop(timeout_s=5)  # idempotent


def test_a_pidfile_naming_another_process_is_stale(run_dir: Path) -> None:
    run_dir.mkdir()
    daemon = StorageDaemon("q", run_dir)
    daemon.pidfile.write_text(f"{os.getpid()}\n")  # a live process, but no daemon of ours
    daemon.statefile.write_text("{}")
    assert daemon.pid is None and not daemon.running()
    assert daemon.adopt() is False
    assert not daemon.pidfile.exists() and not daemon.statefile.exists()
    daemon.stop()  # signals nothing: we are still here


def test_matches_our_command_line_only(tmp_path: Path) -> None:
    daemon = StorageDaemon("q", tmp_path)
    other = StorageDaemon("r", tmp_path)
    assert daemon._matches(daemon.argv())
    assert daemon._matches([f"/usr/bin/{BINARY}", *daemon.argv()[1:]])
    assert not daemon._matches(other.argv())
    assert not daemon._matches(["sleep", *daemon.argv()[1:]])


def test_start_in_a_missing_netns_runs_nothing(fake_bin: Path, run_dir: Path) -> None:
    daemon = StorageDaemon("q", run_dir, netns="vmti-no-such-netns")
    with pytest.raises(NotFound, match="network namespace"):
        daemon.start(timeout_s=1)
    assert not (run_dir / "env.txt").exists()
