"""``vml.cli.plain`` writes what rich would: escaping, markup and lines, to the character."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.markup import render

from vml.cli.plain import STYLES, escape, plain_line, unmarked
from vml.cli.render import harmless

# Text made of what markup is made of, so the odd cases come up often.
_PIECES = st.sampled_from(
    ["[", "]", "\\", "/", "=", "@", "#", " ", "a", "é", "字", "\n", "\t", "[/]", "[b]"]
    + [f"[{s}]" for s in sorted(STYLES)]
    + [f"[/{s}]" for s in sorted(STYLES)]
)
_TEXT = st.lists(_PIECES | st.text(max_size=3), max_size=14).map("".join)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _rich(objects: tuple[object, ...], options: dict[str, object], tty: bool) -> str | None:
    """What VML's rich console (render._safe_console's settings) writes; None if it refuses."""
    buf = _Stream(tty)
    console = Console(
        file=buf,
        force_terminal=tty,
        color_system="standard" if tty else None,
        highlight=False,
        soft_wrap=True,
        emoji=False,
    )
    try:
        console.print(*objects, **options)  # type: ignore[arg-type]
    except Exception:  # a markup error: rich refused it
        return None
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _no_forced_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)


@settings(max_examples=400, deadline=None)
@given(_TEXT)
def test_escape_is_riches(text: str) -> None:
    assert escape(text) == rich_escape(text)


@settings(max_examples=400, deadline=None)
@given(_TEXT)
def test_escaped_text_needs_no_rich_and_shows_as_in_rich(text: str) -> None:
    """Any text, escaped, shows as rich shows it (user text never turns into markup)."""
    text = harmless(text)  # as every line VML prints is
    assert unmarked(escape(text)) == render(escape(text), emoji=False).plain


@settings(max_examples=600, deadline=None)
@given(
    st.lists(_TEXT, min_size=0, max_size=3),
    st.sampled_from([{}, {"style": "red"}, {"markup": False}, {"style": "red", "markup": False}]),
    st.booleans(),
)
def test_a_plain_line_is_what_rich_writes(
    texts: list[str], options: dict[str, object], tty: bool
) -> None:
    objects = tuple(harmless(t) for t in texts)
    line = plain_line(objects, options, _Stream(tty))
    if line is not None:
        assert line == _rich(objects, options, tty)


@pytest.mark.parametrize(
    "markup",
    [
        'E3  incremental  2026-12-01 10:56  stored 2.2 KiB  [cyan]qemu "q" off[/cyan]',
        "[bold]E1[/bold]  full  [yellow](main, v\\[1])[/yellow]  [dim]parent E0[/dim]",
        "[yellow]vml: warning:[/yellow] pack \\\\\\[x] set aside",
        "├── [green]<- you are here: /a/\\[b][/green]",
        "[red]damaged: \\[/red] gone[/red]",
        "nothing changed",
    ],
)
def test_what_vml_prints_to_a_file_needs_no_rich(markup: str) -> None:
    """VML's own lines (styles of :data:`STYLES`, escaped user text) print plain off a terminal."""
    assert plain_line((markup,), {}, _Stream(False)) == _rich((markup,), {}, False)
    assert plain_line((markup,), {"style": "red"}, _Stream(False)) is not None


@pytest.mark.parametrize(
    ("objects", "options", "tty"),
    [
        (("[bold]x[/bold]",), {}, True),  # a style on a terminal
        (("x",), {"style": "red"}, True),
        (("a\tb",), {}, False),  # rich expands tabs
        (("[b]x[/b]",), {}, False),  # rich's alias of bold
        (("[link=https://x]x[/link]",), {}, False),
        (("x[/bold]",), {}, False),  # rich refuses it
        ((1,), {}, False),
        (("x",), {"end": ""}, False),
    ],
)
def test_rich_draws_what_is_not_plain(
    objects: tuple[object, ...], options: dict[str, object], tty: bool
) -> None:
    assert plain_line(objects, options, _Stream(tty)) is None


def test_the_environment_can_ask_for_styles(monkeypatch: pytest.MonkeyPatch) -> None:
    """``FORCE_COLOR`` and ``TTY_COMPATIBLE`` make rich style a pipe: then rich draws."""
    assert plain_line(("x",), {"style": "red"}, _Stream(False)) == "x\n"
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert plain_line(("x",), {"style": "red"}, _Stream(False)) is None
    assert plain_line(("x",), {}, _Stream(False)) == "x\n"
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    assert plain_line(("x",), {"style": "red"}, _Stream(False)) == "x\n"
