"""A Volt service on a temporary SQLite store, its clock moved by the test."""

from __future__ import annotations

from pathlib import Path

from tests.unit.fakes.clock import Clock
from volt.service import VoltService
from volt.store import Store
from volt.topology import load_executor


def make(path: Path, executor: str = "balanced", clock: Clock | None = None) -> VoltService:
    return VoltService(
        Store(f"sqlite:///{path / 'volt.sqlite'}"),
        load_executor(executor),
        node_timeout=60,
        clock=clock or Clock(),
    )
