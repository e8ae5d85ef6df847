"""SPEC.md stays true to the tests: every guarantee has a bound and is enforced by tests that
exist (or is marked bench-only with a benchmark command whose script exists).

Test ids are checked by parsing the test files with ``ast`` (nothing is imported or run):
``tests/x.py::test_name``, ``tests/x.py::TestClass::test_name`` and parametrised ids
``tests/x.py::test_name[case]`` (the case itself is not checked: it is made at collection).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "SPEC.md"

HEADING = re.compile(r"^### (S-(\d+)\.(\d+)) (\S.*)$")
SECTION = re.compile(r"^## (\d+)\. \S")
TEST_ID = re.compile(r"`(tests/[\w/.-]+\.py(?:::[\w\[\].,=:-]+)?)`")
BENCH = re.compile(r"^\*\*Bench-only:\*\* `((?:python3? )?(bench/[\w/-]+\.py)[^`]*)`")
BOUND = re.compile(r"^\*\*Bound:\*\* \S")


@dataclass
class Guarantee:
    number: str
    title: str
    line: int
    bound: bool = False
    tests: list[str] = field(default_factory=list)
    bench: list[tuple[str, str]] = field(default_factory=list)  # (command, script)


def parse(text: str) -> list[Guarantee]:
    guarantees: list[Guarantee] = []
    section = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if m := SECTION.match(line):
            section = int(m.group(1))
            continue
        if m := HEADING.match(line):
            if int(m.group(2)) != section:
                raise AssertionError(f"line {lineno}: {m.group(1)} is not in section {section}")
            guarantees.append(Guarantee(m.group(1), m.group(4), lineno))
            continue
        if not guarantees or line.startswith("## "):
            continue
        current = guarantees[-1]
        if BOUND.match(line):
            current.bound = True
        if m := BENCH.match(line):
            current.bench.append((m.group(1), m.group(2)))
        current.tests.extend(TEST_ID.findall(line))
    return guarantees


def names_in(source: str, filename: str = "<test file>") -> frozenset[str]:
    """``name`` and ``Class::name`` of every test function in a test file's source."""
    names: set[str] = set()
    for node in ast.parse(source, filename=filename).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}::{member.name}")
    return frozenset(n for n in names if n.rpartition("::")[2].startswith("test"))


@cache
def collected_names(path: str) -> frozenset[str]:
    return names_in((ROOT / path).read_text(), path)


def missing(test_id: str) -> str | None:
    """Why ``test_id`` names no test (None: it does)."""
    path, _, name = test_id.partition("::")
    if not (ROOT / path).is_file():
        return f"no file {path}"
    if not name:
        return f"{test_id} names a file, not a test"
    base = name.split("[", 1)[0]
    if "[" in name and not name.endswith("]"):
        return f"{test_id}: unbalanced parameter brackets"
    if base not in collected_names(path):
        return f"no test {base} in {path}"
    return None


def spec() -> list[Guarantee]:
    return parse(SPEC.read_text())


def test_spec_lists_numbered_guarantees_in_order() -> None:
    guarantees = spec()
    assert len(guarantees) >= 40
    numbers = [tuple(int(x) for x in g.number[2:].split(".")) for g in guarantees]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers


def test_every_guarantee_has_a_bound_and_an_enforcer() -> None:
    problems = []
    for g in spec():
        if not g.bound:
            problems.append(f"{g.number} (line {g.line}) has no **Bound:** line")
        if not g.tests and not g.bench:
            problems.append(f"{g.number} (line {g.line}) names no test and is not bench-only")
    assert not problems, "\n".join(problems)


def test_every_named_test_exists() -> None:
    problems = []
    for g in spec():
        for test_id in g.tests:
            why = missing(test_id)
            if why:
                problems.append(f"{g.number}: {why}")
    assert not problems, "\n".join(problems)


def test_every_bench_command_names_a_script_that_exists() -> None:
    problems = [
        f"{g.number}: {command!r}: no {script}"
        for g in spec()
        for command, script in g.bench
        if not (ROOT / script).is_file()
    ]
    assert not problems, "\n".join(problems)


# -- the checker itself ---------------------------------------------------------------------
SAMPLE = """# Spec
## 1. Volt
### S-1.1 Something holds
**Bound:** at once.
Tests: `tests/unit/test_spec.py::test_every_named_test_exists`,
`tests/unit/test_spec.py::test_the_checker_finds_missing_tests[case-1]`
### S-1.2 A benchmark figure
**Bound:** 60 s.
**Bench-only:** `python bench/simulate.py --nodes 1000`
"""


def test_the_checker_parses_guarantees_tests_and_bench_commands() -> None:
    one, two = parse(SAMPLE)
    assert (one.number, one.title, one.bound) == ("S-1.1", "Something holds", True)
    assert one.tests == [
        "tests/unit/test_spec.py::test_every_named_test_exists",
        "tests/unit/test_spec.py::test_the_checker_finds_missing_tests[case-1]",
    ]
    assert two.tests == [] and two.bench == [
        ("python bench/simulate.py --nodes 1000", "bench/simulate.py")
    ]


@pytest.mark.parametrize(
    ("test_id", "problem"),
    [
        ("tests/unit/test_spec.py::test_every_named_test_exists", None),
        ("tests/unit/test_spec.py::test_the_checker_finds_missing_tests[x-1]", None),
        ("tests/unit/test_spec.py::test_nothing_like_this", "no test test_nothing_like_this"),
        ("tests/unit/no_such_file.py::test_x", "no file tests/unit/no_such_file.py"),
        ("tests/unit/test_spec.py", "names a file, not a test"),
        ("tests/unit/test_spec.py::test_every_named_test_exists[x", "unbalanced"),
    ],
)
def test_the_checker_finds_missing_tests(test_id: str, problem: str | None) -> None:
    why = missing(test_id)
    assert (why is None) if problem is None else (why is not None and problem in why), why


def test_the_checker_finds_methods_of_test_classes() -> None:
    source = (
        "class TestThing:\n    def test_a(self):\n        pass\n    def helper(self):\n"
        "        pass\n\nasync def test_b():\n    pass\n\ndef helper():\n    pass\n"
    )
    assert names_in(source) == {"TestThing::test_a", "test_b"}


def test_a_guarantee_without_bound_or_enforcer_is_reported() -> None:
    (g,) = parse("## 2. Virtman\n### S-2.1 Unchecked promise\nNothing enforces it.\n")
    assert not g.bound and not g.tests and not g.bench
    with pytest.raises(AssertionError, match="not in section"):
        parse("## 2. Virtman\n### S-3.1 Misplaced\n")
