"""The parameter types of the command line: counts, sizes, entry names, folders.

Each parses and range-checks through ``vml.values`` while the command line
is read, so a bad value is refused (exit 2, one line: see
``common.VMLGroup``) before a repository is opened or a file touched.  A
numeric option must use one of these types, never a bare ``int``
(``tests/cli/test_values.py`` walks every command to make sure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer._click import Context, Parameter  # typer's own click (pinned: pyproject)
from typer._click.exceptions import BadParameter
from typer._click.types import ParamType

from vml.errors import UsageError
from vml.values import (
    check_name_text,
    entry_number,
    parse_count,
    parse_memory_mib,
    parse_seconds,
    parse_size,
)


class Refused(BadParameter):
    """A value a ``vml.values`` function refused: the CLI prints its error as it is."""

    def __init__(self, error: UsageError, ctx: Context | None, param: Parameter | None) -> None:
        super().__init__(error.message, ctx, param)
        self.error = error


class _Checked(ParamType):
    """A value parsed by a ``vml.values`` function; its UsageError becomes click's."""

    def parse(self, text: str, what: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def convert(self, value: Any, param: Parameter | None, ctx: Context | None) -> Any:
        """Parse ``value`` (click passes defaults that are parsed already through again)."""
        if not isinstance(value, str):
            return value
        what = param.opts[0] if param is not None and param.opts else "the value"
        if param is not None and param.param_type_name == "argument":
            what = (param.name or what).upper()
        try:
            return self.parse(value, what)
        except UsageError as e:
            raise Refused(e, ctx, param) from None


class Count(_Checked):
    """A whole number of things, from 1 (``--keep-last 7``)."""

    name = "count"

    def parse(self, text: str, what: str) -> int:
        """See :func:`vml.values.parse_count`."""
        return parse_count(text, what)


class Size(_Checked):
    """A size in bytes: ``1M``, ``256K``, ``1048576``."""

    name = "size"

    def parse(self, text: str, what: str) -> int:
        """See :func:`vml.values.parse_size`."""
        return parse_size(text, what)


class Memory(_Checked):
    """A VM's memory, in MiB: ``512M``, ``2G`` or ``1024``."""

    name = "memory"

    def parse(self, text: str, what: str) -> int:
        """See :func:`vml.values.parse_memory_mib`."""
        return parse_memory_mib(text, what)


class Seconds(_Checked):
    """A time to wait, in seconds: above 0, up to a day."""

    name = "seconds"

    def parse(self, text: str, what: str) -> float:
        """See :func:`vml.values.parse_seconds`."""
        return parse_seconds(text, what)


class EntryName(_Checked):
    """An entry, tag, branch or commit id; E-numbers out of range are refused here."""

    name = "entry"

    def parse(self, text: str, what: str) -> str:
        """The name as given, once it is not empty and not an impossible E-number."""
        check_name_text(text, f"the entry name ({what})", "name an entry: E3, a tag, a commit id")
        entry_number(text)
        return text


class Folder(_Checked):
    """A folder (an area, a repository): an empty or blank path is never the current folder."""

    name = "folder"

    def parse(self, text: str, what: str) -> Path:
        """The path, once it is not empty or blank."""
        return Path(check_name_text(text, f"the path given for {what}", "write . for this folder"))
