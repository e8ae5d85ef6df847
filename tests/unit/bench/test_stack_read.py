"""bench/stack_read.py's CPU accounting of a pass (the benchmark itself needs root and a
cluster: it is run by hand, see its docstring)."""

from __future__ import annotations

import os
import time

from bench import stack_read


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_busy_seconds_grow_by_at_least_what_this_process_burnt() -> None:
    before = stack_read.cpu_busy_s()
    burn(0.3)
    assert stack_read.cpu_busy_s() - before >= 0.25


def test_the_share_of_a_running_process_is_counted_under_its_command_name() -> None:
    me = stack_read.process_cpu()
    assert os.getpid() in me
    comm = me[os.getpid()][0]
    burn(0.3)
    spent = stack_read.cpu_by_command(me)
    assert spent[comm] >= 0.25


def test_processes_that_started_after_the_first_look_are_not_counted() -> None:
    assert stack_read.cpu_by_command({}) == {}
