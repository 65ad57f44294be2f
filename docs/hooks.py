"""MkDocs hooks (mkdocs.yml ``hooks:``): make README text included by pymdownx.snippets read right on the site.

The README links the docs pages as ``docs/PAGE.md`` (relative to the repository root) and ``benchmarks/README.md``
(the site's ``benchmarks.md``) as ``../docs/PAGE.md``; on the site those pages sit beside the including page, so such
links become ``PAGE.md``. Sphinx-style roles in docstrings and README text
(``:class:`X` ``) are shown as code. Both rewrites run after snippets has inserted the README's sections.
"""

from __future__ import annotations

import re

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor

_README_LINK = re.compile(r"\]\((?:\.\./)?docs/")
_ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|exc|obj):`~?([^`]+)`")


class _ReadmeText(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return [_ROLE.sub(r"`\1`", _README_LINK.sub("](", line)) for line in lines]


class _ReadmeTextExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 - Markdown's API
        # snippets runs at priority 32 and normalize_whitespace at 30: in between, on the included text
        md.preprocessors.register(_ReadmeText(md), "directpred_readme_text", 31)


def on_config(config):  # noqa: ANN001, ANN201 - MkDocs hook signature
    config.markdown_extensions.append(_ReadmeTextExtension())
    return config
