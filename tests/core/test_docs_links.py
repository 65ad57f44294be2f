"""The documentation site's pages that include text of other files (pymdownx.snippets: the README's sections,
``benchmarks/README.md``) link only to pages that exist on the site, after the rewrite of ``docs/hooks.py``: what
``mkdocs build --strict`` checks in ``.ci/run``, here without mkdocs."""

from __future__ import annotations

import importlib.util
import posixpath
import re

import pytest
from conftest import REPO

pytest.importorskip("markdown", reason="the documentation hooks need the docs extra's markdown")

DOCS = REPO / "docs"
SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::([\w-]+))?"$', re.MULTILINE)
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _included(page_text: str) -> list[tuple[str, list[str]]]:
    """(included file, its included lines) for every snippet line of a page."""
    out = []
    for path, section in SNIPPET.findall(page_text):
        lines = (REPO / path).read_text().splitlines()
        if section:
            start = lines.index(f"<!-- --8<-- [start:{section}] -->")
            lines = lines[start + 1 : lines.index(f"<!-- --8<-- [end:{section}] -->")]
        out.append((path, lines))
    return out


def _on_site(page, target: str) -> bool:
    """Whether a relative link of ``page`` names a page of the site, resolved as MkDocs does: within docs/ (a link
    that leaves it, ``../docs/PAGE.md``, names no page even though the file exists)."""
    path = posixpath.normpath(posixpath.join(page.parent.relative_to(DOCS).as_posix(), target))
    return not path.startswith("../") and (DOCS / path).is_file()


def test_included_text_links_only_to_pages_of_the_site():
    rewrite = _hooks()._ReadmeText(None).run
    pages = [page for page in DOCS.rglob("*.md") if SNIPPET.search(page.read_text())]
    assert {p.name for p in pages} >= {"benchmarks.md", "index.md", "training.md"}
    missing = [
        f"{page.relative_to(DOCS)} (from {source}): {target}"
        for page in pages
        for source, lines in _included(page.read_text())
        for line in rewrite(lines)
        for target in LINK.findall(line)
        if not target.startswith(("http://", "https://")) and not _on_site(page, target)
    ]
    assert missing == []
