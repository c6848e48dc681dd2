"""``vml remote``, ``clone``, ``fetch``, ``pull``, ``push``: sharing entries through git servers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vml.cli import completion
from vml.cli.common import (
    Json,
    Quiet,
    RemoteArg,
    entry_argument,
    flag,
    folder_argument,
    handled,
    opened,
)
from vml.cli.plain import escape
from vml.cli.render import bars_wanted, emit_json, err, out, size
from vml.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from vml.porcelain.fetch import FetchResult

# Commands import their porcelain (and dulwich's network client) when they run,
# so the other commands do not pay for it at start-up.

commands = typer.Typer()
remote_app = typer.Typer(
    help="Name the repositories entries are shared with.", no_args_is_help=True
)
commands.add_typer(remote_app, name="remote")


def _ssh_command() -> str | None:
    """The ssh program git would use ($GIT_SSH_COMMAND, $GIT_SSH)."""
    return os.environ.get("GIT_SSH_COMMAND") or os.environ.get("GIT_SSH") or None


@contextmanager
def transfer_bar(what: str) -> Iterator[ProgressFn]:
    """Objects and bytes moved, on a terminal; nothing otherwise."""
    if not bars_wanted():
        yield no_progress
        return
    from rich.progress import BarColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[objects]}"),
        TextColumn("{task.fields[moved]}"),
        console=err.console,
        transient=True,
    )
    task = bar.add_task(what, total=None, objects="", moved="")
    start = time.monotonic()

    def update(phase: str, done: int, total: int) -> None:
        if phase == "objects":
            text = f"{done}/{total} objects" if total else f"{done} objects"
            bar.update(task, completed=done, total=total or None, objects=text)
        elif phase == "bytes":
            rate = done / max(time.monotonic() - start, 1e-3)
            bar.update(task, moved=f"{size(done)}, {size(int(rate))}/s")

    with bar:
        yield update


@remote_app.command("add")
@handled
def remote_add(
    name: Annotated[str, typer.Argument(help="A short name, e.g. origin or alice.")],
    url: Annotated[str, typer.Argument(help="A path, file://, git://, ssh:// or http(s):// URL.")],
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Add remote NAME at URL."""
    from vml.porcelain import remote as remote_mod

    with opened(None) as repo:
        info = remote_mod.add(repo, name, url)
    if json_:
        emit_json(info)
        return
    out.print(f"remote {escape(info.name)} -> {escape(info.url)}")


@remote_app.command("remove")
@handled
def remote_remove(
    name: Annotated[
        str, typer.Argument(help="The remote to forget.", autocompletion=completion.remotes)
    ],
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Forget remote NAME (entries that came from it stay)."""
    from vml.porcelain import remote as remote_mod

    with opened(None) as repo:
        info = remote_mod.remove(repo, name)
    if json_:
        emit_json(info)
        return
    out.print(f"removed remote {escape(info.name)} ({escape(info.url)}); its entries stay here")


@remote_app.command("list")
@handled
def remote_list(quiet: Quiet = False, json_: Json = False) -> None:
    """List remotes."""
    from vml.porcelain import remote as remote_mod

    with opened(None) as repo:
        res = remote_mod.list_remotes(repo)
    if json_:
        emit_json(res)
        return
    if not res:
        out.print("no remotes; add one with `vml remote add NAME URL`")
    for r in res:
        out.print(f"{escape(r.name)}  {escape(r.url)}")


def _print_fetch(res: FetchResult) -> None:
    where = f"from {escape(res.remote)} ({escape(res.url)})" if res.remote else "here"
    if res.objects or res.size:
        out.print(f"received {res.objects} objects, {size(res.size)} {where}")
    for e in res.new_entries:
        there = f" ({escape(res.remote)} {e.remote_entry})" if e.remote_entry else ""
        out.print(f"  new {e.entry}  {e.commit[:12]}{there}")
    for b, at in sorted(res.branches.items()):
        out.print(f"  branch {escape(res.remote)}/{escape(b)} at {at}")
    for t in res.tags:
        out.print(f"  new tag {escape(t)}")
    for t in res.tag_conflicts:
        out.print(f"  [yellow]tag {escape(t)} differs on {escape(res.remote)}; kept yours[/yellow]")
    if not res.new_entries:
        out.print(f"no new entries {where}")
    for miss in res.not_arrived:
        err.print(
            f"[red]vml: did not arrive: {escape(miss.name)} ({miss.commit[:12]}): "
            f"{escape(miss.reason)}[/red]"
        )


def _fail_if_incomplete(res: FetchResult) -> None:
    """Exit 7 when anything the remote advertised did not arrive whole (scripts must notice)."""
    if res.not_arrived:
        err.print(
            f"vml: {len(res.not_arrived)} of what {escape(res.remote or 'the remote')} advertised "
            "did not arrive (its repository is damaged: run `vml fsck` there); the rest did"
        )
        raise typer.Exit(7)


@commands.command()
@handled
def clone(
    url: Annotated[str, typer.Argument(help="The repository to copy: path or URL.")],
    path: Annotated[
        Path | None, folder_argument("Where the new repository goes (default: from URL).")
    ] = None,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Copy a remote VML repository; its entries keep their E-numbers here."""
    from vml.porcelain import clone as clone_mod

    with transfer_bar("cloning") as progress:
        res = clone_mod.clone(url, path, ssh_command=_ssh_command(), progress=progress)
    if json_:
        emit_json(res)
        _fail_if_incomplete(res.fetch)
        return
    out.print(
        f"cloned {escape(res.url)} into {escape(res.path)}: {len(res.fetch.new_entries)} entries, "
        f"{res.fetch.objects} objects, {size(res.fetch.size)} (blocks of {size(res.block_size)})"
    )
    for miss in res.fetch.not_arrived:
        err.print(
            f"[red]vml: did not arrive: {escape(miss.name)} ({miss.commit[:12]}): "
            f"{escape(miss.reason)}[/red]"
        )
    out.print(f"use it with `vml --repo {escape(res.path)} log --graph --all`")
    _fail_if_incomplete(res.fetch)


@commands.command()
@handled
def fetch(
    remote: RemoteArg = None,
    entries: Annotated[
        list[str] | None,
        entry_argument("Only these entries (as the remote names them) and their chains."),
    ] = None,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Get a remote's new entries; each gets a local E-number."""
    from vml.porcelain import fetch as fetch_mod

    with opened(Path(".")) as repo, transfer_bar("fetching") as progress:
        res = fetch_mod.fetch(
            repo, remote, entries or [], ssh_command=_ssh_command(), progress=progress
        )
    if json_:
        emit_json(res)
        _fail_if_incomplete(res)
        return
    _print_fetch(res)
    _fail_if_incomplete(res)


@commands.command()
@handled
def pull(remote: RemoteArg = None, quiet: Quiet = False, json_: Json = False) -> None:
    """Fetch, then move local branches forward to the remote's."""
    from vml.porcelain import pull as pull_mod

    with opened(Path(".")) as repo, transfer_bar("pulling") as progress:
        res = pull_mod.pull(repo, remote, ssh_command=_ssh_command(), progress=progress)
    if json_:
        emit_json(res)
        _fail_if_incomplete(res.fetch)
        return
    _print_fetch(res.fetch)
    for b, e in sorted(res.created.items()):
        out.print(f"  created branch {escape(b)} at {e}")
    for b, e in sorted(res.moved.items()):
        out.print(f"  moved branch {escape(b)} to {e}")
    for b, e in sorted(res.diverged.items()):
        out.print(
            f"  [yellow]branch {escape(b)} diverged: {escape(res.fetch.remote)} has {e}; "
            f"kept yours (both are entries here)[/yellow]"
        )
    _fail_if_incomplete(res.fetch)


@commands.command()
@handled
def push(
    remote: RemoteArg = None,
    entries: Annotated[
        list[str] | None,
        entry_argument("Entries, branches or tags to send (their chains go along)."),
    ] = None,
    all_: Annotated[bool, flag("--all", "Every entry and every branch.")] = False,
    tags: Annotated[bool, flag("--tags", "Every tag too.")] = False,
    force: Annotated[bool, flag("--force", "Move remote branches even backwards.", "-f")] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Send entries to a remote; only objects it lacks travel."""
    from vml.porcelain import push as push_mod

    with opened(Path(".")) as repo, transfer_bar("pushing") as progress:
        res = push_mod.push(
            repo,
            remote,
            entries or [],
            all_entries=all_,
            tags=tags,
            force=force,
            ssh_command=_ssh_command(),
            progress=progress,
        )
    if json_:
        emit_json(res)
        return
    if not (res.entries or res.branches or res.tags):
        out.print(f"{escape(res.remote)} is up to date")
        return
    out.print(
        f"sent {res.objects} objects, {size(res.size)} to {escape(res.remote)} ({escape(res.url)})"
    )
    if res.entries:
        out.print(f"  entries {', '.join(res.entries)}")
    for b, e in sorted(res.branches.items()):
        out.print(f"  branch {escape(b)} -> {e}")
    for t in res.tags:
        out.print(f"  tag {escape(t)}")
