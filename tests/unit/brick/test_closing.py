"""brick.closing.Closing: ``with`` gives the object itself and always ends in ``close()``."""

from __future__ import annotations

from pathlib import Path

import pytest

from brick.closing import Closing
from brick.libvirtd import LibvirtDaemons


class Holder(Closing):
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_with_returns_the_object_and_closes_it_once() -> None:
    holder = Holder()
    with holder as entered:
        assert entered is holder
        assert holder.closed == 0
    assert holder.closed == 1


def test_an_exception_in_the_block_closes_and_propagates() -> None:
    holder = Holder()
    with pytest.raises(KeyError), holder:
        raise KeyError("boom")
    assert holder.closed == 1


def test_libvirt_daemons_start_on_enter_and_stop_on_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    daemons = LibvirtDaemons(tmp_path)
    monkeypatch.setattr(daemons, "start", lambda: calls.append("start"))
    monkeypatch.setattr(daemons, "stop", lambda: calls.append("stop"))
    with daemons as entered:
        assert entered is daemons
        assert calls == ["start"]
    assert calls == ["start", "stop"]
