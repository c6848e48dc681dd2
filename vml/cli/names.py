"""Commands that name entries and lines of work: ``branch``, ``tag``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vml.cli.common import handled, opened
from vml.cli.render import out

# Commands import their porcelain when they run (start-up time: see common.py).

commands = typer.Typer()


@commands.command()
@handled
def branch(
    name: Annotated[
        str | None, typer.Argument(help="New branch name; none lists branches.")
    ] = None,
    entry: Annotated[
        str | None, typer.Argument(help="Where it starts (default: the area's entry).")
    ] = None,
    delete: Annotated[
        bool, typer.Option("--delete", "-d", help="Delete the branch (entries stay).")
    ] = False,
) -> None:
    """List, create or delete branches; the area follows a branch it holds the tip of."""
    from vml.porcelain import names as names_mod

    area = Path(".")
    with opened(area) as repo:
        if name is None:
            for b in names_mod.list_names(repo, "branch", area):
                mark = "*" if b.current else " "
                out.print(f"{mark} {escape(b.name)}  {b.entry}")
            return
        if delete:
            info = names_mod.delete_name(repo, "branch", name)
            out.print(f"deleted branch {escape(info.name)} (was {info.entry})")
            return
        info = names_mod.create_branch(repo, name, entry, area)
        follows = "; this area follows it" if info.current else ""
        out.print(f"branch {escape(info.name)} at {info.entry}{follows}")


@commands.command()
@handled
def tag(
    name: Annotated[str | None, typer.Argument(help="New tag name; none lists tags.")] = None,
    entry: Annotated[str | None, typer.Argument(help="The entry (default: the area's).")] = None,
    delete: Annotated[bool, typer.Option("--delete", "-d", help="Delete the tag.")] = False,
) -> None:
    """List, create or delete tags."""
    from vml.porcelain import names as names_mod

    area = Path(".")
    with opened(area) as repo:
        if name is None:
            for t in names_mod.list_names(repo, "tag"):
                out.print(f"{escape(t.name)}  {t.entry}")
            return
        if delete:
            info = names_mod.delete_name(repo, "tag", name)
            out.print(f"deleted tag {escape(info.name)} (was {info.entry})")
            return
        info = names_mod.create_tag(repo, name, entry, area)
        out.print(f"tag {escape(info.name)} on {info.entry}")
