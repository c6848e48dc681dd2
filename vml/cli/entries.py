"""Commands that make and rebuild entries: ``init``, ``commit``, ``checkout``, ``restore``, ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vml.cli.common import (
    AreaArg,
    Connect,
    EntryArg,
    Json,
    Quiet,
    entry_argument,
    entry_option,
    flag,
    folder_argument,
    handled,
    opened,
    qmp_option,
)
from vml.cli.lookup import repository_path
from vml.cli.params import Size
from vml.cli.plain import escape
from vml.cli.render import emit_json, err, out, print_log, print_repack, progress_bar, size
from vml.errors import UsageError

if TYPE_CHECKING:
    from vml.porcelain.commit import CommitResult

# Each command imports the porcelain it needs when it runs: a `vml` start-up
# pays only for what that command uses (users wait for every save).

commands = typer.Typer()


@commands.command()
@handled
def init(
    path: Annotated[Path | None, folder_argument("Where to create the repository.")] = None,
    block_size: Annotated[
        int,
        typer.Option(
            "--block-size", help="Block size, a power of two: 256K, 1M, 4M.", click_type=Size()
        ),
    ] = "1M",  # type: ignore[assignment]  # parsed by Size; plumbing.repository.DEFAULT_BLOCK_SIZE
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Create a repository."""
    target = path if path is not None else repository_path(None, here=False)
    from vml.porcelain import init as init_mod

    res = init_mod.init(target, block_size)
    if json_:
        emit_json(res)
        return
    out.print(
        f"Initialised an empty VML repository in {escape(res.path)} (blocks of {size(res.block_size)})"
    )


@commands.command()
@handled
def commit(
    area: AreaArg = Path("."),
    message: Annotated[str, typer.Option("--message", "-m", help="What this state is.")] = "",
    full: Annotated[bool, flag("--full", "Save the whole VM.")] = False,
    incremental: Annotated[
        bool, flag("--incremental", "Save changes since the area's entry (default).")
    ] = False,
    differential: Annotated[
        bool, flag("--differential", "Save changes since a base entry.")
    ] = False,
    base: Annotated[
        str | None,
        entry_option("--base", "Base of a differential entry (default: the chain's full entry)."),
    ] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Tag the new entry.")] = None,
    allow_empty: Annotated[
        bool, flag("--allow-empty", "Make an entry even if nothing changed.")
    ] = False,
    force_running: Annotated[
        bool, flag("--force-running", "Save a running VM (crash-consistent).")
    ] = False,
    include_external: Annotated[
        bool,
        flag(
            "--include-external",
            "Save files the VM needs outside the area too (under .external/ in the entry).",
        ),
    ] = False,
    move: Annotated[
        bool, flag("--move", "Save to this repository from now on (the area was saved elsewhere).")
    ] = False,
    qmp: Annotated[
        Path | None,
        qmp_option("Save the running QEMU on this QMP socket live (VML did not start it)."),
    ] = None,
    connect: Connect = None,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Save the VM in AREA as a new entry (live, memory and all, when it runs)."""
    from vml.porcelain import commit as commit_mod

    kinds = [
        k
        for k, on in (("full", full), ("incremental", incremental), ("differential", differential))
        if on
    ]
    if len(kinds) > 1:
        raise UsageError(
            f"--{kinds[0]} and --{kinds[1]} exclude each other",
            "choose one of --full, --incremental, --differential",
        )
    if base is not None and kinds != ["differential"]:
        raise UsageError("--base goes with --differential", "add --differential or drop --base")
    with opened(area) as repo, progress_bar("saving") as progress:
        res = commit_mod.commit(
            repo,
            area,
            message=message,
            kind=kinds[0] if kinds else None,
            base=base,
            tag=tag,
            allow_empty=allow_empty,
            force_running=force_running,
            include_external=include_external,
            move=move,
            progress=progress,
            qmp=qmp,
            libvirt_uri=connect or None,
        )
    if res.repack_problem is not None:
        err.print(
            f"[yellow]warning:[/yellow] {escape(res.repack_problem)}; the entry is saved; "
            "run `vml verify --all` and `vml gc`"
        )
    if json_:
        emit_json(res)
        return
    _print_commit(res)


def _print_commit(res: CommitResult) -> None:
    out.print(res.entry)
    parent = f"parent {res.parent}" if res.parent else "no parent"
    extra = f", tag {escape(res.tag)}" if res.tag else ""
    extra += f", branch {escape(res.branch)}" if res.branch else ""
    live = _live_phrase(res.live)
    out.print(
        f"{res.kind} entry {res.entry} ({parent}{extra}): read {size(res.read_bytes)}, "
        f"stored {size(res.stored_bytes)} of {size(res.logical_bytes)}, {res.seconds:.2f} s"
        + (f"; {live}" if live else "")
    )
    if res.crash_consistent:
        out.print(
            "[yellow]note:[/yellow] the VM was running: this entry is crash-consistent "
            "(it boots as after a power cut)"
        )
    for e in res.external:
        out.print(
            f"[yellow]note:[/yellow] saved {escape(e.source)} (outside the area) as {escape(e.path)}"
        )
    for note in res.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    if res.branch_moved_on:
        out.print(
            f"[yellow]note:[/yellow] branch {escape(res.branch_moved_on)} moved on elsewhere: "
            "it stays where it is, and this area no longer follows it"
        )
    if res.repacked is not None:
        print_repack(res.repacked)


def _live_phrase(live: dict[str, object] | None) -> str:
    """``saved running (live through libvirt), paused 0.31 s`` for a live save, else ''."""
    if live is None:
        return ""
    via = {"qmp": " through QMP", "libvirt": " through libvirt"}.get(str(live.get("via")), "")
    pause = live.get("pause_seconds")
    paused = f", guest paused {pause:.2f} s" if isinstance(pause, int | float) else ""
    return f"saved running{via}{paused}"


@commands.command()
@handled
def checkout(
    entry: EntryArg,
    area: AreaArg = Path("."),
    force: Annotated[bool, flag("--force", "Overwrite unsaved changes.", "-f")] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Build ENTRY into AREA (created if missing)."""
    _build(entry, area, force, json_, restore=False)


def _names(paths: list[str], most: int = 10) -> str:
    shown = ", ".join(escape(p) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


@commands.command()
@handled
def restore(
    entry: Annotated[str, entry_argument("The entry to go back to.")],
    area: AreaArg = Path("."),
    force: Annotated[bool, flag("--force", "Discard unsaved changes.", "-f")] = False,
    quiet: Quiet = False,
    json_: Json = False,
) -> None:
    """Go back to ENTRY in AREA; the next save branches the tree there."""
    _build(entry, area, force, json_, restore=True)


def _build(entry: str, area: Path, force: bool, json_: bool, *, restore: bool) -> None:
    """``checkout`` and ``restore``: build ``entry`` into ``area`` and say what was written."""
    from vml.porcelain import checkout as checkout_mod

    build = checkout_mod.restore if restore else checkout_mod.checkout
    with opened(area) as repo, progress_bar("restoring" if restore else "checking out") as bar:
        res = build(repo, entry, area, force=force, progress=bar)
    if json_:
        emit_json(res)
        return
    if out.quiet:
        # -q prints nothing: formatting the lines would load rich's markup
        # code (~30 ms) once the files are written, for nothing.
        return
    how = "in place" if res.in_place else "fresh"
    out.print(
        f"{'restored' if restore else 'checked out'} {res.entry} into {escape(res.area)} ({how}): "
        f"wrote {size(res.written_bytes)} of {size(res.logical_bytes)}, "
        f"{len(res.files_written)} files updated, {len(res.files_removed)} removed, "
        f"{res.seconds:.2f} s"
    )
    if res.files_removed:
        out.print(f"removed: {_names(res.files_removed)}")
    if res.left_alone:
        out.print(
            f"[yellow]left alone[/yellow] (in no entry of this area): {_names(res.left_alone)}"
        )
    for note in res.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    if restore:
        out.print(f"the next `vml commit` here makes a child of {res.entry}")


@commands.command()
@handled
def demo(
    folder: Annotated[Path, folder_argument("An empty or new folder to play in.")] = Path(
        "vml-demo"
    ),
    quiet: Quiet = False,
) -> None:
    """Make a small sample VM, save three states, check one out, show the tree."""
    from vml.plumbing.repository import open_repository
    from vml.porcelain import demo as demo_mod
    from vml.porcelain import log as log_mod

    with progress_bar("demo") as progress:
        res = demo_mod.demo(folder, progress=progress)
    out.print(
        f"[bold]A sample VMware VM[/bold] in {escape(res.area)}, a repository in {escape(res.repo)}"
    )
    steps = [
        "saved the fresh VM",
        "worked in it, saved what changed",
        "worked more, saved against the base",
    ]
    for text, c in zip(steps, res.commits, strict=True):
        out.print(
            f"  $ vml commit   -> {c.entry} {c.kind}: {text}; stored {size(c.stored_bytes)} "
            f"of {size(c.logical_bytes)}"
        )
    for co in res.checkouts:
        out.print(
            f"  $ vml checkout {co.entry} {escape(co.area)}  -> rebuilt and verified, {co.seconds:.2f} s"
        )
    out.print("\n[bold]vml log --graph --all[/bold]")
    repo = open_repository(Path(res.repo))
    try:
        print_log(log_mod.log(repo), True, set())
    finally:
        repo.close()
    out.print(
        f"\nTry: cd {escape(res.area)} && vml status; vml log --graph; vml checkout E1 ../e1-copy"
    )
