"""Every reStructuredText document of the repository parses without errors: a malformed
table or a bad directive renders as an error box, or not at all."""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core
import docutils.nodes
import docutils.utils
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted([ROOT / "README.rst", *(ROOT / "docs").rglob("*.rst")])
# Sphinx's roles and directives (:doc:, .. toctree::, ...) are unknown to plain docutils
SPHINX_ONLY = ("Unknown interpreted text role", "Unknown directive type")


def parse_errors(text: str) -> list[str]:
    """The first line of every error docutils finds in ``text``, Sphinx-only names aside."""
    settings = {"report_level": 5, "halt_level": 5, "warning_stream": io.StringIO()}
    document = docutils.core.publish_doctree(text, settings_overrides=settings)
    found = []
    for message in document.findall(docutils.nodes.system_message):
        first = message.astext().splitlines()[0]
        if message["level"] >= docutils.utils.Reporter.ERROR_LEVEL and not any(
            name in first for name in SPHINX_ONLY
        ):
            found.append(first)
    return found


def test_the_check_finds_a_malformed_table_and_passes_sphinx_roles() -> None:
    text = "T\n=\n\n===  ===\na    b\n===  ===\nabcdef  x\n===  ===\n\n:doc:`x`\n"
    assert parse_errors(text) == ["<string>:7: (ERROR/3) Malformed table."]
    assert parse_errors("T\n=\n\n:doc:`x`\n\n.. toctree::\n\n   a\n") == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_document_parses_without_errors(path: Path) -> None:
    assert parse_errors(path.read_text(encoding="utf-8")) == []
