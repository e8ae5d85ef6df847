"""brick.proc: when a process of ours counts as ended (by PID, never by name), and how a
process is described in a log line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from brick import proc
from brick.wait import wait_until


def test_a_running_process_of_ours_has_not_ended() -> None:
    assert proc.ended(os.getpid(), lambda pid: True) is False


def test_a_reaped_process_has_ended() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert proc.ended(child.pid, lambda pid: True) is True


def test_a_zombie_has_ended() -> None:
    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    assert proc.is_gone(child.pid) and proc.ended(child.pid, lambda pid: True)
    child.wait()


def test_a_reused_pid_running_another_program_has_ended() -> None:
    assert proc.ended(os.getpid(), lambda pid: False) is True


def test_a_process_still_exiting_has_not_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exiting process has released its memory, so its argv reads empty and it no longer
    looks like ours, while it is not a zombie yet (seen with a SIGKILLed tgtd under load)."""
    monkeypatch.setattr(proc, "cmdline", lambda pid: [])
    assert proc.ended(os.getpid(), lambda pid: False) is False


TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100000A:2A41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100000A:2A41 0300000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100000A:0CBC 0400000A:C351 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0100000A:2A41 0200000A:C352 01 00000000:00000000 00:00000000 00000000     0        0 4 1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 000000FD000000000000000001000000:2A41 000000FD000000000000000009000000:D431 01 0 0
   1: 0000000000000000FFFF00000100000A:2A41 0000000000000000FFFF00000500000A:D432 01 0 0
"""


def test_established_peers_reads_both_tables(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    tables = (str(tmp_path / "tcp"), str(tmp_path / "tcp6"))
    # port 0x2A41 = 10817: established ones only (not the listener), in table order
    assert proc.established_peers(10817, tables) == ["10.0.0.3", "10.0.0.2", "fd00::9", "10.0.0.5"]
    assert proc.established_peers(3260, tables) == ["10.0.0.4"]


def test_describe_names_a_process_its_state_and_where_it_waits() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        wait_until(lambda: proc.describe(child.pid).split()[2] == "S", timeout_s=5, what="sleep")
        pid, comm, state, *wchan = proc.describe(child.pid).split()
        assert (int(pid), comm, state) == (child.pid, "sleep", "S")
        assert all("sleep" in w for w in wchan), wchan  # hrtimer_nanosleep here
    finally:
        child.kill()
        child.wait()
    assert proc.describe(child.pid) == f"{child.pid} ?"
