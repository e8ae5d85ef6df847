"""tgtd's targets as ``brick.tgt.TgtAdm`` shows them, in memory (create, list, delete)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Lun:
    backing_path: str


@dataclass
class Target:
    iqn: str
    luns: list[Lun]


class FakeTgt:
    def __init__(self) -> None:
        self.made: dict[str, Target] = {}

    def create_target(self, iqn: str, path: Path, **kw: object) -> int:
        self.made.setdefault(iqn, Target(iqn, [Lun(str(path))]))
        return list(self.made).index(iqn) + 1

    def targets(self) -> list[Target]:
        return list(self.made.values())

    def delete_target(self, iqn: str) -> None:
        self.made.pop(iqn, None)

    def connections(self, iqn: str) -> list[object]:
        return []
