"""Sphinx extension: ``$...$`` in docstrings becomes ``:math:`...``` for the API page.

The package's docstrings write mathematics the way the chapters do (``$W_0 \\in
\\mathbb{R}^{d\\times k}$``), which reads well in ``help()`` and in an editor. Autodoc parses
docstrings as reStructuredText, where a dollar sign is plain text, so without this the API
page would show raw LaTeX.
"""

from __future__ import annotations

import re
from typing import Any

# $...$ but not $$...$$ and not an escaped \$; it may wrap onto the next line of a paragraph.
_INLINE = re.compile(r"(?<![\\$])\$(?!\$)([^$]+?)(?<!\\)\$(?!\$)")


def dollars_to_math(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        if re.search(r"\n\s*\n", body):  # never across paragraphs
            return match.group(0)
        return ":math:`" + " ".join(part.strip() for part in body.splitlines()) + "`"
    return _INLINE.sub(replace, text)


def _process(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    # Join, convert, split: a formula may wrap, and the line count may shrink, which is fine.
    lines[:] = dollars_to_math("\n".join(lines)).split("\n")


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
