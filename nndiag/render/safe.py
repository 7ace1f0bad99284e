"""Making untrusted strings (tensor names, keys, paths from a checkpoint) safe to print.

A name read from a file can hold terminal escape sequences (``ESC [31m`` recolours the
terminal, ``ESC ] 0;...BEL`` sets its title), line breaks that split a table row, or
bidirectional controls (U+202E) that show text in another order than it is. Before any
such string reaches a terminal it goes through ``printable``, which replaces every control
character with a visible escape. JSON output needs none of this: ``json.dumps`` escapes control
characters itself.
"""

from __future__ import annotations

import re

# C0 controls (ESC, BEL, CR, LF, TAB...), DEL, C1 controls (CSI \x9b, OSC \x9d, NEL \x85...),
# the Unicode line and paragraph separators, and the bidirectional controls that reorder
# what a terminal shows (U+202A-U+202E embeddings and overrides, U+2066-U+2069 isolates, the
# marks U+200E, U+200F and U+061C): "Trojan Source" text.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                     "\u200e\u200f\u061c]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    r"""Return ``text`` as a string with every control character written as a visible escape.

    Args:
        text: A string (anything else is converted with ``str``).

    Returns:
        The same text on one line, with ``ESC`` as ``\x1b``, a newline as ``\n``, DEL as
        ``\x7f``, C1 controls as ``\x9b``..., U+2028/U+2029 as ``\u2028``/``\u2029`` and
        the bidirectional controls as ``\u202e``...
        Printable text, including non-ASCII letters, is unchanged.

    Example:
        >>> printable("layer\x1b[31m.weight\n")
        'layer\\x1b[31m.weight\\n'
    """
    return _UNSAFE.sub(_escape, str(text))
