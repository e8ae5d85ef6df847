"""vmt-demo's Daemon.stop on a process that ignores SIGTERM: killed after the timeout, and
when it dumps stacks, every thread's stack is in its log first (where it hung)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VMT_DEMO = Path(__file__).resolve().parents[3] / "vmt-demo"
if str(VMT_DEMO) not in sys.path:
    sys.path.insert(0, str(VMT_DEMO))

from cluster import Daemon  # noqa: E402

from brick.wait import wait_until  # noqa: E402

HANGS = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
def stuck_in_shutdown():
    time.sleep(600)
stuck_in_shutdown()
"""


def _daemon(tmp_path: Path, *, dumps_stacks: bool) -> Daemon:
    log = tmp_path / "daemon.out"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", HANGS], stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: "ready" in log.read_text() or proc.poll() is not None, timeout_s=30,
               what="the process to start")  # fmt: skip
    assert proc.poll() is None, log.read_text()
    return Daemon("n1", None, proc, log, dumps_stacks=dumps_stacks)  # type: ignore[arg-type]


def test_a_hung_stop_dumps_the_stacks_then_kills(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, dumps_stacks=True)
    assert daemon.stop(timeout=0.5) == -9
    text = daemon.log_text()
    assert "stuck_in_shutdown" in text, text
    assert "Current thread" in text or "Thread 0x" in text, text


def test_without_stack_dumps_a_hung_stop_is_only_killed(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, dumps_stacks=False)
    assert daemon.stop(timeout=0.5) == -9
    assert "stuck_in_shutdown" not in daemon.log_text()
