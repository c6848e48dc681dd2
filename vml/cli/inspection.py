"""Commands that show what is there: ``log``, ``show``, ``status``, ``areas``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vml.cli.common import AreaArg, EntryArg, Json, Quiet, count_option, flag, handled, opened
from vml.cli.plain import escape
from vml.cli.render import emit_json, out, print_log, saved_state, size, vm_brief, vm_lines
from vml.errors import VMLError

# Commands import their porcelain when they run (start-up time: see common.py).

commands = typer.Typer()


@commands.command()
@handled
def log(
    graph: Annotated[bool, flag("--graph", "Draw the dependency trees.")] = False,
    all_: Annotated[bool, flag("--all", "Every tree, not only the current area's.")] = False,
    max_count: Annotated[
        int | None,
        count_option("--max-count", "Only the N newest entries (with --graph: their trees).", "-n"),
    ] = None,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """List entries, newest first; --graph draws the forest."""
    from vml.porcelain import log as log_mod

    area = Path(".")
    with opened(area) as repo:
        here: set[str] = set()
        st = None
        try:
            from vml.plumbing.areas import load_state

            st = load_state(area)
        except VMLError:
            st = None
        only = None if all_ or st is None or not st.entry else st.entry
        res = log_mod.log(repo, only_tree_of=only, limit=max_count)
        if st is not None and st.entry:
            here = {le.id for le in res.entries.values() if le.commit == st.entry}
    if json_:
        emit_json(res.oldest_first())
        return
    print_log(res, graph, here, cut=max_count is not None)


@commands.command()
@handled
def show(
    entry: EntryArg,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """An entry's metadata, files, and the chain that builds it."""
    from vml.porcelain import log as log_mod

    with opened(Path(".")) as repo:
        res = log_mod.show(repo, entry)
    if json_:
        emit_json(res)
        return
    le = res.entry
    out.print(f"[bold]{le.id}[/bold]  {le.kind}  commit {le.commit}")
    out.print(f"created   {escape(log_mod.human_time(le.created))} from {escape(le.origin_area)}")
    if le.message:
        out.print(f"message   {escape(le.message)}")
    if le.labels:
        out.print(f"names     {escape(', '.join(le.labels))}")
    if le.remote:
        out.print(f"fetched   from {escape(le.remote)}")
    out.print(f"chain     {' -> '.join(res.chain)}")
    for note in le.rewritten:
        out.print(f"reshaped  {escape(note)}")
    out.print(
        f"stored    {size(le.stored_bytes)} by this entry, of {size(le.logical_bytes)} logical"
    )
    for line in vm_lines(le.vm):
        out.print(line)
    out.print("files")
    for f in res.files:
        out.print(f"  {size(f.size):>10}  {escape(f.kind):<5}  {escape(f.path)}")


@commands.command()
@handled
def status(area: AreaArg = Path("."), quiet: Quiet = False, json_: Json = False) -> None:
    """The area's entry and what changed since."""
    from vml.porcelain import status as status_mod

    with opened(area) as repo:
        res = status_mod.status(repo, area)
    if json_:
        emit_json(res)
        return
    where = res.entry or "no entry yet"
    if res.branch:
        where += f" on branch {res.branch}"
    saved = saved_state(res.entry_vm)
    out.print(f"area {escape(res.area)} holds {where}" + (f" ({saved})" if saved else ""))
    for line in vm_lines(res.vm, "vm now"):
        out.print(line)
    if res.pending:
        out.print(
            f"[red]an interrupted checkout of {res.pending[:12]} must be finished: run `vml checkout {res.pending[:12]}`[/red]"
        )
    if res.damage is not None:
        out.print(
            f"[red]the entry this area holds is damaged ({escape(res.damage)}): "
            "changes cannot be listed; run `vml fsck`[/red]"
        )
        return
    if not res.changes:
        out.print("nothing changed")
        return
    for c in res.changes:
        extra = (
            f" ({size(c.changed_bytes)} changed)"
            if c.change == "modified" and c.changed_bytes is not None
            else ""
        )
        out.print(f"  {c.change:<9} {escape(c.path)}{extra}")


@commands.command()
@handled
def areas(quiet: Quiet = False, json_: Json = False) -> None:
    """The working areas of this repository and whether they have unsaved changes."""
    from vml.porcelain import areas as areas_mod

    with opened(Path(".")) as repo:
        res = areas_mod.list_areas(repo)
    if json_:
        emit_json(res)
        return
    if not res:
        out.print("no areas yet")
    for a in res:
        if not a.exists:
            state = "missing"
        elif a.damage is not None:
            state = f"[red]its entry is damaged: {escape(a.damage)}[/red]"
        elif a.dirty is None:
            state = "unknown"
        else:
            state = "unsaved changes" if a.dirty else "clean"
        br = f" on {a.branch}" if a.branch else ""
        brief = f"  {escape(vm_brief(a.vm))}" if vm_brief(a.vm) else ""
        if a.vml_run is not None:
            brief += f"  [green]{escape(a.vml_run.state)} under vml run now[/green]"
        out.print(f"{escape(a.path)}  {a.entry or '-'}{br}  {state}{brief}")
