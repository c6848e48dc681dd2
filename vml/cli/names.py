"""Commands that name entries and lines of work: ``branch``, ``tag``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vml.cli import completion
from vml.cli.common import Json, Quiet, entry_argument, flag, handled, opened
from vml.cli.plain import escape
from vml.cli.render import emit_json, out
from vml.errors import UsageError

# Commands import their porcelain when they run (start-up time: see common.py).

commands = typer.Typer()


@commands.command()
@handled
def branch(
    name: Annotated[
        str | None,
        typer.Argument(
            help="New branch name; none lists branches.", autocompletion=completion.branches
        ),
    ] = None,
    entry: Annotated[
        str | None, entry_argument("Where it starts (default: the area's entry).")
    ] = None,
    delete: Annotated[bool, flag("--delete", "Delete the branch (entries stay).", "-d")] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """List, create or delete branches; the area follows a branch it holds the tip of."""
    _name_command("branch", name, entry, delete, json_)


@commands.command()
@handled
def tag(
    name: Annotated[
        str | None,
        typer.Argument(help="New tag name; none lists tags.", autocompletion=completion.tags),
    ] = None,
    entry: Annotated[str | None, entry_argument("The entry (default: the area's).")] = None,
    delete: Annotated[bool, flag("--delete", "Delete the tag.", "-d")] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """List, create or delete tags."""
    _name_command("tag", name, entry, delete, json_)


def _name_command(
    kind: str, name: str | None, entry: str | None, delete: bool, json_: bool
) -> None:
    """``vml branch`` and ``vml tag``: list, delete or create one ``kind`` of name."""
    from vml.porcelain import names as names_mod

    if delete and (name is None or entry is not None):
        raise UsageError(
            f"--delete takes one {kind} name and no entry", f"e.g. `vml {kind} -d NAME`"
        )
    area = Path(".")
    with opened(area) as repo:
        if name is None:
            listed = names_mod.list_names(repo, kind, area)
            if json_:
                emit_json(listed)
                return
            for n in listed:
                mark = ("* " if n.current else "  ") if kind == "branch" else ""
                out.print(f"{mark}{escape(n.name)}  {n.entry}")
            return
        if delete:
            info = names_mod.delete_name(repo, kind, name)
            said = f"deleted {kind} {escape(info.name)} (was {info.entry})"
        elif kind == "tag":
            info = names_mod.create_tag(repo, name, entry, area)
            said = f"tag {escape(info.name)} on {info.entry}"
        else:
            info = names_mod.create_branch(repo, name, entry, area)
            follows = "; this area follows it" if info.current else ""
            said = f"branch {escape(info.name)} at {info.entry}{follows}"
    if json_:
        emit_json(info)
    else:
        out.print(said)
