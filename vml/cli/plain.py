"""What rich prints, without importing rich, where that is plain text.

Importing rich's console and markup costs ~40 ms of CPU at every start
(its styles, colours, segments, emoji tables), more than most of a small
command's own work, and most lines VML prints are plain: a save's summary,
an error on a stream that is not a terminal, a listing piped to another
program.  :func:`escape` is rich's ``rich.markup.escape``, and
:func:`plain_line` gives what rich's console would write for a ``print``
when that is text alone, or None when rich must draw it (styles on a
terminal, tabs, markup it would refuse).  ``tests/cli/test_plain.py``
holds both to rich's own output.
"""

from __future__ import annotations

import os
import re
from typing import TextIO

# rich.markup.RE_TAGS and the pattern of rich.markup.escape, as rich 15 has them.
_TAGS = r"((\\*)\[([a-z#/@][^[]*?)])"
_TAG_TEXT = r"(\\*)(\[[a-z#/@][^[]*?])"

#: The style tags VML's markup uses, each its own normalized name for rich (a tag
#: rich would read otherwise, ``[b]`` or ``[red bold]``, is left to rich).
STYLES = frozenset(
    {"bold", "dim", "italic", "underline", "red", "green", "yellow", "blue", "magenta", "cyan"}
)


def escape(text: str) -> str:
    """``text`` with rich markup escaped, as ``rich.markup.escape`` does."""

    def doubled(match: re.Match[str]) -> str:
        backslashes, tag = match.groups()
        return f"{backslashes}{backslashes}\\{tag}"

    text = re.sub(_TAG_TEXT, doubled, text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


def unmarked(markup: str) -> str | None:
    """The text rich's markup ``markup`` shows (tags gone, escapes undone), or None if unsure.

    None for what rich would refuse (a closing tag that matches nothing) or
    read as more than a style of :data:`STYLES` (links, handlers, ``[b]``):
    rich itself renders those.
    """
    if "[" not in markup:
        return markup
    pieces: list[str] = []
    opened: list[str] = []
    position = 0
    for match in re.finditer(_TAGS, markup):
        whole, escapes, tag = match.groups()
        start, end = match.span()
        if start > position:
            pieces.append(markup[position:start])
        position = end
        if escapes:
            backslashes, escaped = divmod(len(escapes), 2)
            pieces.append("\\" * backslashes)
            if escaped:
                pieces.append(whole[len(escapes) :])
                continue
        if not _tag_read(tag, opened):
            return None
    pieces.append(markup[position:])
    # rich undoes `\[` piece by piece (a backslash and an escaped tag stay apart).
    return "".join(p.replace("\\[", "[") for p in pieces)


def _tag_read(tag: str, opened: list[str]) -> bool:
    """Open or close ``tag`` on ``opened`` as rich does; False where rich is to decide."""
    if not tag.startswith("/"):
        if tag not in STYLES:
            return False
        opened.append(tag)
        return True
    name = tag[1:].strip()
    if not name:
        if not opened:
            return False
        opened.pop()
        return True
    if name not in STYLES or name not in opened:
        return False
    del opened[len(opened) - 1 - opened[::-1].index(name)]
    return True


def shows_styles(stream: TextIO) -> bool:
    """Whether rich would send styles to ``stream``: a terminal, or told so by the environment."""
    # rich.console.Console.is_terminal, in its order.
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "1"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def plain_line(
    objects: tuple[object, ...], options: dict[str, object], stream: TextIO
) -> str | None:
    """What rich's ``print(*objects, **options)`` writes on ``stream``, or None if rich must.

    Plain when every object is a string and the options are ``style`` and
    ``markup`` at most; then the line is the strings' text, tags gone,
    where ``stream`` shows no styles, and only text without markup or style
    where it does.  Tabs are left to rich (it expands them).
    """
    if not all(isinstance(o, str) for o in objects) or not set(options) <= {"style", "markup"}:
        return None
    texts = [o for o in objects if isinstance(o, str)]
    styled = shows_styles(stream)
    if styled and options.get("style"):
        return None
    parts: list[str] = []
    for text in texts:
        if "\t" in text:
            return None
        if options.get("markup", True):
            if styled and "[" in text:
                return None
            shown = unmarked(text)
            if shown is None:
                return None
            text = shown
        parts.append(text)
    return " ".join(parts) + "\n"
