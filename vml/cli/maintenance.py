"""Maintenance commands: reshape the entry forest (``rm``, ``convert``, ``prune``), give back
space (``gc``) and check the repository (``verify``, ``fsck``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vml.cli import completion
from vml.cli.common import (
    Json,
    Quiet,
    count_option,
    entry_argument,
    entry_option,
    flag,
    handled,
    opened,
)
from vml.cli.plain import escape
from vml.cli.render import emit_json, out, print_repack, progress_bar, size
from vml.errors import CorruptRepository

if TYPE_CHECKING:
    from vml.plumbing.packscan import PackRepair
    from vml.porcelain.reshape import RewriteReport
    from vml.porcelain.verify import CheckResult

# Commands import their porcelain when they run (start-up time: see common.py).

commands = typer.Typer()


def _print_rewrite(res: RewriteReport) -> None:
    for r in res.rewritten:
        note = f"  ({escape(r.note)})" if r.note else ""
        out.print(f"  rewrote {r.entry}: {r.old[:12]} -> {r.new[:12]}{note}")
    for m in res.areas_moved:
        where = m.new[:12] if m.new else "no entry"
        out.print(f"  area {escape(m.name)}: {m.old[:12]} -> {where}")
    out.print(
        f"wrote {size(res.pack_bytes)} ({size(res.data_bytes)} of block data; "
        f"{res.reused_blocks} blocks reused, {res.anchored_blocks} anchored)"
    )


@commands.command()
@handled
def rm(
    entries: Annotated[list[str], entry_argument("Entries to remove: E3, a tag, ...")],
    force: Annotated[
        bool, flag("--force", "Remove entries areas hold or tags name.", "-f")
    ] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Remove entries; their children move onto their parent (no image data copied)."""
    from vml.porcelain import rm as rm_mod

    with opened(Path(".")) as repo, progress_bar("removing") as progress:
        res = rm_mod.rm(repo, entries, force=force, progress=progress)
    if json_:
        emit_json(res)
        return
    out.print(f"removed {', '.join(res.removed)}")
    if res.left_damaged:
        out.print(
            f"[yellow]left as they were:[/yellow] {', '.join(res.left_damaged)}: they rest on a "
            "damaged entry's data and stay damaged (remove them too, or fetch the removed entry "
            "back from a copy of the repository)"
        )
    _print_rewrite(res)
    out.print("run `vml gc` to give back the space of blocks no entry uses any more")


@commands.command()
@handled
def convert(
    entry: Annotated[str, entry_argument("The entry to re-express.")],
    to: Annotated[str, typer.Option("--to", help="full, differential or incremental.")],
    base: Annotated[
        str | None,
        entry_option("--base", "The new parent (default: chain root / previous save)."),
    ] = None,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Re-express ENTRY against another parent; its content stays the same."""
    from vml.porcelain import convert as convert_mod

    with opened(Path(".")) as repo, progress_bar("converting") as progress:
        res = convert_mod.convert(repo, entry, to, base=base, progress=progress)
    if json_:
        emit_json(res)
        return
    if not res.changed:
        out.print(f"{res.entry} is already {res.kind} on {res.parent or 'nothing'}; nothing to do")
        return
    was = f"{res.old_kind} on {res.old_parent}" if res.old_parent else res.old_kind
    now = f"{res.kind} on {res.parent}" if res.parent else res.kind
    out.print(f"{res.entry}: {was} -> {now}")
    _print_rewrite(res)


@commands.command()
@handled
def prune(
    keep_last: Annotated[int | None, count_option("--keep-last", "Keep the newest N.")] = None,
    keep_hourly: Annotated[int | None, count_option("--keep-hourly", "Keep N hourly.")] = None,
    keep_daily: Annotated[int | None, count_option("--keep-daily", "Keep N daily.")] = None,
    keep_weekly: Annotated[int | None, count_option("--keep-weekly", "Keep N weekly.")] = None,
    keep_monthly: Annotated[int | None, count_option("--keep-monthly", "Keep N monthly.")] = None,
    keep_yearly: Annotated[int | None, count_option("--keep-yearly", "Keep N yearly.")] = None,
    keep_tag: Annotated[
        list[str] | None,
        typer.Option(
            "--keep-tag", help="Keep the entry this tag names.", autocompletion=completion.tags
        ),
    ] = None,
    dry_run: Annotated[bool, flag("--dry-run", "Only say what would go.", "-n")] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Forget entries by a retention policy, per area; held, tagged and branch entries stay."""
    from vml.plumbing.retention import Policy
    from vml.porcelain import prune as prune_mod

    counts = (keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    policy = Policy(*(n or 0 for n in counts))
    with opened(Path(".")) as repo:
        res = prune_mod.prune(repo, policy, keep_tags=keep_tag or [], dry_run=dry_run)
    if json_:
        emit_json(res)
        return
    for d in res.keep:
        out.print(f"keep    {d.entry:<6} {escape(d.created)}  {escape(', '.join(d.reasons))}")
    verb = "would remove" if dry_run else "remove"
    for d in res.remove:
        out.print(f"{verb:<7} {d.entry:<6} {escape(d.created)}")
    if not res.remove:
        out.print("nothing to remove")
    elif dry_run:
        out.print(f"{len(res.remove)} entries would go; run again without --dry-run to remove them")
    elif res.rm is not None:
        _print_rewrite(res.rm)
        out.print("run `vml gc` to give back the space")


@commands.command()
@handled
def gc(
    dry_run: Annotated[bool, flag("--dry-run", "Only say what would be freed.", "-n")] = False,
    repair: Annotated[
        bool,
        flag(
            "--repair",
            "Rebuild the index of set-aside packs, or salvage them; number whole entries "
            "that lost their number (no collecting).",
        ),
    ] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Give back the space of blocks and objects no entry reaches."""
    from vml.porcelain import gc as gc_mod

    with opened(Path(".")) as repo, progress_bar("collecting") as progress:
        res = gc_mod.gc(repo, dry_run=dry_run, repair=repair, progress=progress)
    if json_:
        emit_json(res)
        return
    if res.repaired is not None:
        if res.repaired or not res.numbered:
            _print_repair(res.repaired)
        for name in res.numbered:
            out.print(f"numbered {name}: a whole entry an area or an entry relied on had no number")
        return
    if json_:
        emit_json(res)
        return
    kept = sum(1 for p in res.packs if p.action == "keep")
    rewritten = sum(1 for p in res.packs if p.action == "rewrite")
    deleted = sum(1 for p in res.packs if p.action == "delete")
    out.print(
        f"{res.live_objects} objects in use, {res.dead_objects} unused; packs: {kept} kept, "
        f"{rewritten} rewritten, {deleted} deleted; {res.loose_dead} loose objects unused"
    )
    if res.dry_run:
        out.print(f"would free about {size(max(res.freed_bytes, 0))}")
    elif res.deferred:
        out.print(
            "another vml command is saving: nothing was deleted; run `vml gc` again when it is done"
        )
    else:
        out.print(
            f"freed {size(res.freed_bytes)} (deleted {size(res.deleted_bytes)}, "
            f"wrote {size(res.written_bytes)})"
        )
    if res.repacked is not None:
        print_repack(res.repacked)


def _print_repair(done: list[PackRepair]) -> None:
    if not done:
        out.print("no pack is set aside or without its index: nothing to repair")
        return
    for r in done:
        if r.action == "reindexed":
            out.print(f"{r.pack}: {escape(r.problem)}; rebuilt its index ({r.objects} objects)")
        elif r.action == "salvaged":
            into = f" into {r.new_pack}" if r.new_pack else " (all were in other packs)"
            out.print(
                f"{r.pack}: {escape(r.problem)}; salvaged {r.objects} objects{into}, "
                f"{r.lost} could not be read; moved aside to {escape(', '.join(r.quarantined))}"
            )
        else:
            out.print(
                f"{r.pack}: {escape(r.problem)}; moved aside to {escape(', '.join(r.quarantined))}"
            )
    if all(r.action == "reindexed" for r in done):
        out.print("every pack is whole again; `vml gc` may collect as usual")
    else:
        out.print("run `vml verify --all` to see which entries lost data, then `vml gc`")


def _print_check(res: CheckResult, json_: bool, what: str) -> None:
    """The problems on stdout (or the document); when there are any, one error line and exit 7."""
    if json_:
        emit_json(res)
    for p in res.problems:
        where = " ".join(x for x in (p.entry, p.path) if x)
        objs = f" [objects {', '.join(o[:12] for o in p.objects)}]" if p.objects else ""
        at = f" {escape(where)}" if where else ""
        out.print(f"[red]bad[/red]{at}: {escape(p.message + objs)}")
    for n in res.notes:
        where = " ".join(x for x in (n.entry, n.path) if x)
        at = f" {escape(where)}" if where else ""
        out.print(f"[yellow]note[/yellow]{at}: {escape(n.message)}")
    if res.clean:
        out.print(f"{what}: {len(res.checked)} entries, no problems")
        return
    affected = ", ".join(res.affected) or "none"
    out.print(f"{what}: {len(res.problems)} problems; entries affected: {affected}")
    # And one error line on stderr, which -q and --json keep too.
    raise CorruptRepository(
        f"{what} found {len(res.problems)} problems (entries affected: {affected})",
        "see the problems listed (without -q); `vml fsck` checks the structure",
    )


@commands.command()
@handled
def verify(
    entries: Annotated[list[str] | None, entry_argument("Entries to check.")] = None,
    all_: Annotated[bool, flag("--all", "Check every entry.")] = False,
    read_data: Annotated[
        bool, flag("--read-data", "Also rebuild every file in memory and check its digest.")
    ] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Check that entries rebuild: every object's id (and with --read-data every file)."""
    from vml.porcelain import verify as verify_mod

    with opened(Path(".")) as repo, progress_bar("verifying") as progress:
        res = verify_mod.verify(
            repo, entries or [], all_entries=all_, read_data=read_data, progress=progress
        )
    _print_check(res, json_, "verify")


@commands.command()
@handled
def fsck(quiet: Quiet = False, json_: Json = False) -> None:
    """Check the repository's structure quickly: refs, entries, manifests, object presence."""
    from vml.porcelain import fsck as fsck_mod

    with opened(Path(".")) as repo, progress_bar("checking") as progress:
        res = fsck_mod.fsck(repo, progress=progress)
    _print_check(res, json_, "fsck")
