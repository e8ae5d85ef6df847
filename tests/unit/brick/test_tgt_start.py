"""TgtDaemon.start's readiness check on a slow machine (no tgtd needed: the supervisor's
spawn and tgtadm are replaced)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from brick.exception import Timeout
from brick.tgt.daemon import TgtDaemon


def test_a_tgtadm_call_that_times_out_while_tgtd_starts_is_not_ready_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loaded TCG guest's first tgtadm took over its 5 s bound and the start failed at
    once; a slow answer is "not ready yet": the spawn's own bound decides."""
    daemon = TgtDaemon(3999, ["127.0.0.1:3260"], run_dir=tmp_path)
    answers = iter([False, Timeout("command tgtadm", 5.0), True])  # before, slow, up

    def answer(**_: Any) -> bool:
        step = next(answers)
        if isinstance(step, Exception):
            raise step
        return step

    readiness: list[bool] = []

    def spawn(argv: list[str], *, ready: Any, **_: Any) -> None:
        readiness.extend([ready(), ready()])

    monkeypatch.setattr(daemon.adm, "answers", answer)
    monkeypatch.setattr(daemon, "adopt", lambda: False)
    monkeypatch.setattr(daemon.supervisor, "check_netns", lambda: None)
    monkeypatch.setattr(daemon.supervisor, "spawn", spawn)
    monkeypatch.setattr("brick.tgt.daemon._listening", lambda pid: {"127.0.0.1:3260"})
    daemon.start(timeout_s=1)
    assert readiness == [False, True]
