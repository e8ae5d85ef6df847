"""brick.proc.ended: when a process of ours counts as ended (by PID, never by name)."""

from __future__ import annotations

import os
import subprocess

import pytest

from brick import proc


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
