"""brick.sharing: the users of a shared daemon, and LibvirtDaemons(shared=True) on top."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

import brick.libvirtd
from brick.daemon import start_time
from brick.exception import InvalidArgument
from brick.libvirtd import LibvirtDaemons
from brick.sharing import SharedUse


def test_the_last_user_out_is_told_so(tmp_path: Path) -> None:
    first, second = SharedUse(tmp_path), SharedUse(tmp_path)
    with first.locked():
        first.join()
        first.join()  # idempotent: one entry
    with second.locked():
        second.join()
    assert first.others() == [os.getpid()] and second.others() == [os.getpid()]
    with first.locked():
        assert first.leave() is False  # second still uses it
    with second.locked():
        assert second.leave() is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]


def test_entries_of_ended_or_reused_pids_do_not_count(tmp_path: Path) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / f"{ended.pid}-dead").write_text(f"{ended.pid} 1\n")
    me = os.getpid()
    (tmp_path / f"{me}-reused").write_text(f"{me} {start_time(me)}1\n")  # not our start
    (tmp_path / "9-junk").write_text("junk\n")
    use = SharedUse(tmp_path)
    use.join()
    assert use.others() == []
    assert use.leave() is True
    assert list(tmp_path.iterdir()) == []


def test_the_lock_keeps_a_second_user_waiting(tmp_path: Path) -> None:
    got = threading.Event()

    def other() -> None:
        with SharedUse(tmp_path).locked():
            got.set()

    with SharedUse(tmp_path).locked():
        thread = threading.Thread(target=other)
        thread.start()
        assert not got.wait(0.3)
    assert got.wait(10)
    thread.join()


def test_a_relative_folder_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        SharedUse("users")


def _fake_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped: list[int]
) -> LibvirtDaemons:
    """A shared LibvirtDaemons whose libvirtd (pid 4242) is adopted and stopped on paper."""
    daemons = LibvirtDaemons(tmp_path, shared=True)

    def ensure(daemon: str) -> None:
        if daemon == "libvirtd":
            daemons._owned[daemon] = 4242

    def stop(timeout_s: float = 0.0, **_: Any) -> None:
        stopped.append(daemons._supervisors["libvirtd"].pid or 0)

    monkeypatch.setattr(daemons, "_ensure", ensure)
    monkeypatch.setattr(daemons, "_is_ours", lambda daemon, pid: True)
    monkeypatch.setattr(daemons._supervisors["libvirtd"], "stop", stop)
    return daemons


def test_shared_daemons_are_stopped_by_the_last_user_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(brick.libvirtd, "libvirt_answers", lambda uri: True)
    stopped: list[int] = []
    first = _fake_daemons(tmp_path, monkeypatch, stopped)
    second = _fake_daemons(tmp_path, monkeypatch, stopped)
    first.start()
    second.start()  # another session, same run folder: adopts the same libvirtd
    first.stop()
    assert stopped == [] and first.owned == {}  # second still uses it
    second.stop()
    assert stopped == [4242]
