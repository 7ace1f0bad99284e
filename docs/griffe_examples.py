"""A griffe extension for the API reference: ``Example:`` sections read as code.

nndiag's docstrings title their doctest sections ``Example:``; griffe's Google-style parser
knows only ``Examples:`` and would render the doctest as prose (where ``[...][:1]`` reads as a
link). ``mkdocs.yml`` loads this extension for mkdocstrings.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE_TITLE = re.compile(r"^(\s*)Example:$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Retitle ``Example:`` as ``Examples:`` before a docstring is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the object's docstring title, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)
