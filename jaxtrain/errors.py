"""The one exception type that means "the user asked for something impossible", and the
helpers that keep its message one short line.

The CLI prints a ``UserError`` as a single line on stderr and exits non-zero; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import reprlib

# Long enough for a key, a value and the accepted choices; short enough for a terminal.
MESSAGE_LIMIT = 400


class UserError(Exception):
    """A bad config value, a missing file or another mistake the user can fix.

    The message must be one line that names the cause and the config key or file.
    """


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 80


def quote(value: object, limit: int = 60) -> str:
    """``value`` for a message that quotes user input: at most ``limit`` characters and
    one line, whatever was typed or read.

    A printable string is shown as it is, an exception as its message's first line;
    anything else (a string with newlines or control characters, a list, a number) as
    its ``repr``. The cost is bounded too:
    reprlib stops at a few levels and items, and a huge integer is described, not
    printed (``repr`` of one over 4300 digits raises).
    """
    if isinstance(value, BaseException):  # its message's first line
        value = (str(value).strip().splitlines() or [type(value).__name__])[0]
    if isinstance(value, str):
        head = value[: limit + 1]
        text = head if head.isprintable() else repr(head)
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        text = f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    else:
        try:
            text = _REPR.repr(value)
        except Exception:  # a broken __repr__ must not hide the user's error
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """The first line of ``message``, cut to ``limit`` characters: the CLI's backstop for
    a message that quotes more than it should."""
    lines = message.strip().splitlines() or [""]
    line = lines[0] + (" ..." if len(lines) > 1 else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."
