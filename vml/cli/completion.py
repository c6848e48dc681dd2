"""Shell completion of names: entries, tags, branches, remotes.

``vml --install-completion`` installs typer's script for the user's shell;
the shell then runs ``vml`` with ``_VML_COMPLETE`` set, and click asks the
parameter being completed.  The functions here answer for entry, tag,
branch and remote parameters by reading the repository the command would
use (``--repo`` if already typed, ``$VML_REPO``, the current area's, the
default).  Completion must never print or fail: any error means no
suggestions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from vml.plumbing.refs import RefTable
    from vml.plumbing.repository import Repository

Suggestions = list[tuple[str, str]]


def _names(
    ctx: typer.Context, read: Callable[[Repository], Suggestions], incomplete: str
) -> Suggestions:
    """``read(repository)``'s suggestions that start with ``incomplete``; none on any error."""
    try:
        from vml.cli.lookup import repository_path
        from vml.plumbing.repository import open_repository

        typed = ctx.find_root().params.get("repo")
        repo = open_repository(repository_path(None, explicit=Path(typed) if typed else None))
        try:
            found = read(repo)
        finally:
            repo.close()
    except Exception:
        return []
    low = incomplete.lower()
    return [(v, h) for v, h in found if v.lower().startswith(low)]


def _refs(repo: Repository) -> RefTable:
    from vml.plumbing.refs import read_refs

    return read_refs(repo)


def _entries(repo: Repository) -> Suggestions:
    table = _refs(repo)
    labels = {c: ", ".join(x) for c, x in table.labels().items()}
    out = [(f"E{n}", labels.get(c, "entry")) for n, c in sorted(table.entries.items())]
    out += [(t, "tag") for t in sorted(table.tags)]
    out += [(b, "branch") for b in sorted(table.branches)]
    return out


def entries(ctx: typer.Context, incomplete: str) -> Suggestions:
    """E-numbers (with the names on them), tags and branches."""
    return _names(ctx, _entries, incomplete)


def tags(ctx: typer.Context, incomplete: str) -> Suggestions:
    """Tag names."""
    return _names(ctx, lambda r: [(t, "tag") for t in sorted(_refs(r).tags)], incomplete)


def branches(ctx: typer.Context, incomplete: str) -> Suggestions:
    """Branch names."""
    return _names(ctx, lambda r: [(b, "branch") for b in sorted(_refs(r).branches)], incomplete)


def remotes(ctx: typer.Context, incomplete: str) -> Suggestions:
    """Remote names, with their URLs."""

    def read(repo: Repository) -> Suggestions:
        from vml.plumbing.remotes import list_remotes

        return list(list_remotes(repo).items())

    return _names(ctx, read, incomplete)
