"""No import cycles among the product packages: every ``import`` counts, at module level,
inside functions and under ``if TYPE_CHECKING:`` alike (a cycle hidden behind
TYPE_CHECKING is still two modules that each need the other to be understood).

The graph is read with ``ast`` (nothing is imported): one node per module of ``volt``,
``virtman``, ``brick``, ``voltclient`` and ``virtmanclient``; an edge for each import of
another product module (``from pkg import mod`` names the module ``pkg.mod`` when it is one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("volt", "virtman", "brick", "voltclient", "virtmanclient")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the product packages under root."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute name of a (possibly relative) ``from ... import``'s module."""
    if not level:
        return name or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base.pop()
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The product modules ``module`` imports anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node.level, node.module)
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in known else source
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "a.b.c" of a module "a.b": "a.b"
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def graph_of(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def test_the_product_packages_have_no_import_cycle() -> None:
    graph = graph_of(ROOT)
    assert len(graph) > 80  # every package was read
    assert cycles(graph) == []


def test_the_dm_cache_layers_do_not_import_the_driver() -> None:
    graph = graph_of(ROOT)
    assert "virtman.drivers.dm.context" in graph["virtman.drivers.dm.cache"]
    assert "virtman.drivers.dm.driver" not in graph["virtman.drivers.dm.cache"]


def test_a_cycle_behind_type_checking_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "virtman"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from virtman.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import A\n"
    )
    (pkg / "c.py").write_text("def f():\n    import virtman.a.thing\n")
    for package in PACKAGES[:1] + PACKAGES[2:]:
        (tmp_path / package).mkdir(exist_ok=True)
    graph = graph_of(tmp_path)
    assert graph["virtman.sub.b"] == {"virtman.a"}
    assert graph["virtman.c"] == {"virtman.a"}
    assert cycles(graph) == [["virtman.a", "virtman.sub.b"]]
