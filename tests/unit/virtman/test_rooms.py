"""Which code lives where: libvirt only in the guest room, benchmarks only in bench/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_the_guest_room_of_virtman_imports_libvirt() -> None:
    guest = ROOT / "virtman" / "guest"
    users = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "virtman").rglob("*.py")
        if "libvirt" in imported(path) and guest not in path.parents
    }
    assert users == set()
    assert "libvirt" in imported(guest / "domains.py")


def test_only_the_daemon_entry_point_imports_the_guest_room_and_none_a_benchmark() -> None:
    def users(prefix: str) -> set[str]:
        return {
            str(path.relative_to(ROOT))
            for path in (ROOT / "virtman").rglob("*.py")
            if (ROOT / "virtman" / "guest") not in path.parents
            and any(n == prefix or n.startswith(prefix + ".") for n in imported(path))
        }

    # virtmanserver owns the node's guests (issue 12); the stack's code never sees them.
    assert users("virtman.guest") == {"virtman/cmd/server.py"}
    assert users("bench") == set()
