"""A griffe extension for the API pages, which render fxghost's docstrings as Markdown.

- Doctests at a docstring's top level (``pytest --doctest-modules`` runs them) would read as
  nested block quotes, each output line joined to the code and ``[...]`` outputs taken for
  cross-references: each run of them is fenced as a ``pycon`` block. Doctests inside a section
  (``Examples:``) are indented and left to griffe's own parser.
- Sphinx roles (``:func:`name```) would show the role itself: they become inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|exc|data|obj|const):`~?([^`]+)`")


def fence_doctests(text: str) -> str:
    """``text`` with every unindented doctest (``>>>`` lines, ``...`` continuations and their
    output, up to a blank line) inside a ```` ```pycon ```` fence; fenced blocks are kept."""
    out: list[str] = []
    in_fence = in_doctest = False
    for line in text.splitlines():
        if in_doctest and not line.strip():
            out.append("```")
            in_doctest = False
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_doctest and line.startswith(">>>"):
            out.append("```pycon")
            in_doctest = True
        out.append(line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


def markdown_docstring(text: str) -> str:
    return ROLE.sub(r"`\1`", fence_doctests(text))


class ReadableDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
