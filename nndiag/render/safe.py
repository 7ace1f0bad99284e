"""Making untrusted strings (tensor names, keys, paths from a checkpoint) safe to print.

A name read from a file can hold terminal escape sequences (``ESC [31m`` recolours the
terminal, ``ESC ] 0;...BEL`` sets its title) or line breaks that split a table row. Before any
such string reaches a terminal it goes through ``printable``, which replaces every control
character with a visible escape. JSON output needs none of this: ``json.dumps`` escapes control
characters itself.
"""

from __future__ import annotations

import re

# C0 controls (ESC, BEL, CR, LF, TAB...), DEL, C1 controls (CSI \x9b, OSC \x9d, NEL \x85...),
# and the Unicode line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
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
        ``\x7f``, C1 controls as ``\x9b``..., and U+2028/U+2029 as ``\u2028``/``\u2029``.
        Printable text, including non-ASCII letters, is unchanged.

    Example:
        >>> printable("layer\x1b[31m.weight\n")
        'layer\\x1b[31m.weight\\n'
    """
    return _UNSAFE.sub(_escape, str(text))
