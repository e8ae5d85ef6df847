"""Run a command (an argv list, never a shell string), log it once, raise on failure."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
    elapsed = time.monotonic() - started
    LOG.debug(
        "ran %s: rc %d in %.3f s%s",
        _masked(argv),
        proc.returncode,
        elapsed,
        f"; stderr: {proc.stderr.strip()[-300:]}" if proc.stderr.strip() else "",
    )
    allowed = (0,) if check_exit_code is True else check_exit_code or ()
    if check_exit_code is not False and proc.returncode not in allowed:
        raise CommandFailed(argv, proc.returncode, proc.stderr)
    return Result(proc.stdout, proc.stderr, proc.returncode)
