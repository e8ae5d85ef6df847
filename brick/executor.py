"""Run a command (an argv list, never a shell string), log it once, raise on failure.

Commands that need root (``brick.privileged.process.ROOT_COMMANDS``) go to the privileged
entry point ``execute_root`` when privsep is on; every other command runs here, unprivileged.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import brick.privileged
import brick.privileged.process
from brick.exception import CommandFailed, Timeout

LOG = logging.getLogger(__name__)
SECRET_FLAGS = frozenset({"--password", "--initiator-password", "--outgoing-password"})


@dataclass(frozen=True)
class Result:
    stdout: str
    stderr: str
    exit_code: int


def _masked(argv: Sequence[str]) -> list[str]:
    shown, hide_next = [], False
    for arg in argv:
        shown.append("***" if hide_next else arg)
        hide_next = arg in SECRET_FLAGS
    return shown


def execute(
    argv: Sequence[str],
    *,
    check_exit_code: bool | Sequence[int] = True,
    timeout_s: float = 60.0,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run ``argv``; with ``check_exit_code`` (True: only 0; or the allowed codes) raise
    ``CommandFailed`` on any other exit code, ``Timeout`` if it runs past ``timeout_s``."""
    if isinstance(argv, str) or not argv or any(not isinstance(a, str) for a in argv):
        raise TypeError(f"argv must be a non-empty list of str, got {argv!r}")
    started = time.monotonic()
    if brick.privileged.enabled() and brick.privileged.process.needs_root(argv):
        stdout, stderr, exit_code, timed_out = brick.privileged.process.execute_root(
            list(argv), stdin, timeout_s, None if env is None else dict(env)
        )
        if timed_out:
            LOG.warning("%s: timed out after %.1f s (privileged)", _masked(argv), timeout_s)
            raise Timeout(f"command {argv[0]}", timeout_s)
        proc = Result(stdout, stderr, exit_code)
    else:
        proc = _run_here(argv, stdin, timeout_s, env)
    elapsed = time.monotonic() - started
    LOG.debug(
        "ran %s: rc %d in %.3f s%s",
        _masked(argv),
        proc.exit_code,
        elapsed,
        f"; stderr: {proc.stderr.strip()[-300:]}" if proc.stderr.strip() else "",
    )
    allowed = (0,) if check_exit_code is True else check_exit_code or ()
    if check_exit_code is not False and proc.exit_code not in allowed:
        raise CommandFailed(argv, proc.exit_code, proc.stderr)
    return proc


def _run_here(
    argv: Sequence[str], stdin: str | None, timeout_s: float, env: Mapping[str, str] | None
) -> Result:
    """Run ``argv`` in this process's own privileges."""
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired:
        LOG.warning("%s: timed out after %.1f s", _masked(argv), timeout_s)
        raise Timeout(f"command {argv[0]}", timeout_s) from None
    return Result(proc.stdout, proc.stderr, proc.returncode)
