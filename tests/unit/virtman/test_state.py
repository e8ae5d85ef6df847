"""Virtman's state on disk: the journal (corrupt, modes) and the retry schedule (issue 10)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from virtman.backoff import Backoff
from virtman.errors import JournalCorrupt
from virtman.journal import Journal


@pytest.mark.parametrize(
    "content",
    [b'{"images": {}, "instan', b"\x00\x00\x00\x00", b"[1, 2]", b'{"images": []}', b"\xff\xfe"],
)
def test_issue_10_a_corrupt_journal_is_refused_and_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "journal.json"
    path.write_bytes(content)
    with pytest.raises(JournalCorrupt, match=str(path)) as err:
        Journal(path)
    assert "docs/virtman.rst" in str(err.value)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]


def test_issue_10_journal_is_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.json"
    journal = Journal(path)
    journal.put("instances", "vm1", {"image": "volume-a"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["instances"] == {"vm1": {"image": "volume-a"}}
    assert Journal(path).instances() == {"vm1": {"image": "volume-a"}}


def test_issue_10_backoff_doubles_up_to_the_cap_and_starts_over() -> None:
    now = [1000.0]
    backoff = Backoff(5, 60, clock=lambda: now[0])
    assert backoff.remaining() is None
    assert [backoff.failed() for _ in range(6)] == [5, 10, 20, 40, 60, 60]
    assert backoff.remaining() == 60
    now[0] += 59.5
    assert backoff.remaining() == 0.5
    now[0] += 1
    assert backoff.remaining() == 0
    backoff.reset()
    assert backoff.remaining() is None and backoff.failed() == 5
    assert Backoff(1, 300).delay(10_000) == 300  # no overflow after a long outage
    with pytest.raises(ValueError):
        Backoff(10, 5)
