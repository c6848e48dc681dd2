"""The ``vml`` command: a small typer app over the porcelain."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape

from vml import __version__
from vml.cli.render import (
    err,
    out,
    print_log,
    print_repack,
    progress_bar,
    report_error,
    size,
    vm_brief,
    vm_lines,
    warnings_said_once,
)
from vml.errors import NoSpace, VMLError
from vml.plumbing.repository import DEFAULT_BLOCK_SIZE, Repository, open_repository, parse_size
from vml.porcelain.common import find_repository

if TYPE_CHECKING:
    from vml.porcelain.checkout import CheckoutResult

# Each command imports the porcelain it needs when it runs: a `vml` start-up
# pays only for what that command uses (users wait for every save).

app = typer.Typer(
    name="vml",
    help="Git-style versioning for virtual machines: save, branch and restore VM states.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def handled(fn: F) -> F:
    """Run a command, turning VML errors (and a few OS ones) into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings_said_once():
                return fn(*args, **kwargs)
        except VMLError as e:
            report_error(e)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                report_error(NoSpace("no space left on the device"))
                raise typer.Exit(NoSpace.exit_code) from None
            where = f" ({e.filename})" if e.filename else ""
            report_error(
                VMLError(f"{e.strerror or e}{where}", "check the path and its permissions")
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("vml: interrupted; earlier entries are intact", style="red")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class _Ctx:
    repo_option: Path | None = None


_ctx = _Ctx()


def _default_repo() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "vml"


def repository_path(area: Path | None) -> Path:
    return find_repository(_ctx.repo_option, os.environ.get("VML_REPO"), area, _default_repo())


def repository_for(area: Path | None = None) -> Repository:
    """Open the repository the command works on (see :func:`repository_path`)."""
    return open_repository(repository_path(area))


@contextmanager
def opened(area: Path | None = None) -> Iterator[Repository]:
    """The command's repository, closed again however the command ends."""
    repo = repository_for(area)
    try:
        yield repo
    finally:
        repo.close()


def _version(value: bool) -> None:
    if value:
        out.print(f"vml {__version__}")
        raise typer.Exit()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _tune_allocator() -> None:
    """Keep 1 MiB block buffers on the heap instead of fresh mmaps.

    glibc serves allocations this large with mmap and gives them back at
    once, so every block read or built costs 256 page faults of zeroed
    memory: a third of a restore's time went to the kernel.  Raising the
    thresholds lets freed buffers be reused (peak RSS grows by a few MiB).
    """
    try:
        # The process's own symbols include libc (find_library would run ldconfig).
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


@app.callback()
def main_options(
    repo: Annotated[
        Path | None,
        typer.Option(
            "--repo",
            "-R",
            help="Repository path (else $VML_REPO, else the area's own, else ~/.local/share/vml).",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Git-style versioning for virtual machines."""
    _ctx.repo_option = repo
    _tune_allocator()
    # File names need not be UTF-8: one that is not is shown escaped, never
    # a crash half way through a listing.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
AreaArg = Annotated[Path, typer.Argument(help="The working area (a folder holding one VM).")]


@app.command()
@handled
def init(
    path: Annotated[Path | None, typer.Argument(help="Where to create the repository.")] = None,
    block_size: Annotated[
        str, typer.Option("--block-size", help="Block size, e.g. 256K, 1M, 4M.")
    ] = str(DEFAULT_BLOCK_SIZE),
) -> None:
    """Create a repository."""
    target = path if path is not None else repository_path(None)
    from vml.porcelain import init as init_mod

    res = init_mod.init(target, parse_size(block_size))
    out.print(
        f"Initialised an empty VML repository in {escape(res.path)} (blocks of {size(res.block_size)})"
    )


@app.command()
@handled
def commit(
    area: AreaArg = Path("."),
    message: Annotated[str, typer.Option("--message", "-m", help="What this state is.")] = "",
    full: Annotated[bool, typer.Option("--full", help="Save the whole VM.")] = False,
    incremental: Annotated[
        bool, typer.Option("--incremental", help="Save changes since the area's entry (default).")
    ] = False,
    differential: Annotated[
        bool, typer.Option("--differential", help="Save changes since a base entry.")
    ] = False,
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="Base of a differential entry (default: the chain's full entry)."
        ),
    ] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Tag the new entry.")] = None,
    allow_empty: Annotated[
        bool, typer.Option("--allow-empty", help="Make an entry even if nothing changed.")
    ] = False,
    force_running: Annotated[
        bool, typer.Option("--force-running", help="Save a running VM (crash-consistent).")
    ] = False,
    include_external: Annotated[
        bool,
        typer.Option(
            "--include-external",
            help="Save files the VM needs outside the area too (under .external/ in the entry).",
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Save the VM in AREA as a new entry."""
    from vml.porcelain import commit as commit_mod

    kinds = [
        k
        for k, on in (("full", full), ("incremental", incremental), ("differential", differential))
        if on
    ]
    if len(kinds) > 1:
        raise VMLError("choose one of --full, --incremental, --differential", "")
    with opened(area) as repo, progress_bar(not quiet, "saving") as progress:
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
            progress=progress,
        )
    out.print(res.entry)
    parent = f"parent {res.parent}" if res.parent else "no parent"
    extra = f", tag {res.tag}" if res.tag else ""
    extra += f", branch {res.branch}" if res.branch else ""
    out.print(
        f"{res.kind} entry {res.entry} ({parent}{extra}): read {size(res.read_bytes)}, "
        f"stored {size(res.stored_bytes)} of {size(res.logical_bytes)}, {res.seconds:.2f} s"
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
    if res.repacked is not None:
        print_repack(res.repacked)
    if res.repack_problem is not None:
        err.print(
            f"[yellow]warning:[/yellow] {escape(res.repack_problem)}; the entry is saved; "
            "run `vml verify --all` and `vml gc`"
        )


@app.command()
@handled
def checkout(
    entry: Annotated[str, typer.Argument(help="Entry: E3, 3, a tag, a branch or a commit id.")],
    area: AreaArg = Path("."),
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Overwrite unsaved changes.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Build ENTRY into AREA (created if missing)."""
    from vml.porcelain import checkout as checkout_mod

    with opened(area) as repo, progress_bar(not quiet, "checking out") as progress:
        res = checkout_mod.checkout(repo, entry, area, force=force, progress=progress)
    _print_checkout(res, "checked out")


def _print_checkout(res: CheckoutResult, verb: str) -> None:
    how = "in place" if res.in_place else "fresh"
    out.print(
        f"{verb} {res.entry} into {escape(res.area)} ({how}): wrote {size(res.written_bytes)} "
        f"of {size(res.logical_bytes)}, {len(res.files_written)} files updated, "
        f"{len(res.files_removed)} removed, {res.seconds:.2f} s"
    )
    if res.files_removed:
        out.print(f"removed: {_names(res.files_removed)}")
    if res.left_alone:
        out.print(
            f"[yellow]left alone[/yellow] (in no entry of this area): {_names(res.left_alone)}"
        )
    for note in res.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")


def _names(paths: list[str], most: int = 10) -> str:
    shown = ", ".join(escape(p) for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


@app.command()
@handled
def restore(
    entry: Annotated[str, typer.Argument(help="The entry to go back to.")],
    area: AreaArg = Path("."),
    force: Annotated[bool, typer.Option("--force", "-f", help="Discard unsaved changes.")] = False,
    quiet: Quiet = False,
) -> None:
    """Go back to ENTRY in AREA; the next save branches the tree there."""
    from vml.porcelain import checkout as checkout_mod

    with opened(area) as repo, progress_bar(not quiet, "restoring") as progress:
        res = checkout_mod.restore(repo, entry, area, force=force, progress=progress)
    _print_checkout(res, "restored")
    out.print(f"the next `vml commit` here makes a child of {res.entry}")


@app.command()
@handled
def log(
    graph: Annotated[bool, typer.Option("--graph", help="Draw the dependency trees.")] = False,
    all_: Annotated[
        bool, typer.Option("--all", help="Every tree, not only the current area's.")
    ] = False,
    json_: Json = False,
) -> None:
    """List entries; --graph draws the forest."""
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
        res = log_mod.log(repo, only_tree_of=only)
        if st is not None and st.entry:
            here = {le.id for le in res.entries.values() if le.commit == st.entry}
    if json_:
        items = sorted(res.entries.values(), key=lambda x: x.created)
        print(json.dumps([le.to_json() for le in items], indent=1))
        return
    print_log(res, graph, here)


@app.command()
@handled
def show(
    entry: Annotated[str, typer.Argument(help="The entry.")],
    json_: Json = False,
) -> None:
    """An entry's metadata, files, and the chain that builds it."""
    from vml.porcelain import log as log_mod

    with opened(Path(".")) as repo:
        res = log_mod.show(repo, entry)
    if json_:
        print(json.dumps(res.to_json(), indent=1))
        return
    le = res.entry
    out.print(f"[bold]{le.id}[/bold]  {le.kind}  commit {le.commit}")
    out.print(f"created   {log_mod.human_time(le.created)} from {escape(le.origin_area)}")
    if le.message:
        out.print(f"message   {escape(le.message)}")
    if le.labels:
        out.print(f"names     {', '.join(le.labels)}")
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
        out.print(f"  {size(f.size):>10}  {f.kind:<5}  {escape(f.path)}")


@app.command()
@handled
def status(area: AreaArg = Path("."), json_: Json = False) -> None:
    """The area's entry and what changed since."""
    from vml.porcelain import status as status_mod

    with opened(area) as repo:
        res = status_mod.status(repo, area)
    if json_:
        doc = {
            "area": res.area,
            "entry": res.entry,
            "commit": res.commit,
            "branch": res.branch,
            "pending": res.pending,
            "clean": res.clean,
            "changes": [c.__dict__ for c in res.changes],
            "vm": res.vm,
            "damage": res.damage,
        }
        print(json.dumps(doc, indent=1))
        return
    where = res.entry or "no entry yet"
    if res.branch:
        where += f" on branch {res.branch}"
    out.print(f"area {escape(res.area)} holds {where}")
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


@app.command()
@handled
def areas(json_: Json = False) -> None:
    """The working areas of this repository and whether they have unsaved changes."""
    from vml.porcelain import areas as areas_mod

    with opened(Path(".")) as repo:
        res = areas_mod.list_areas(repo)
    if json_:
        print(json.dumps([a.to_json() for a in res], indent=1))
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
        out.print(f"{escape(a.path)}  {a.entry or '-'}{br}  {state}{brief}")


@app.command()
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


@app.command()
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


@app.command()
@handled
def demo(
    folder: Annotated[Path, typer.Argument(help="An empty or new folder to play in.")] = Path(
        "vml-demo"
    ),
    quiet: Quiet = False,
) -> None:
    """Make a small sample VM, save three states, check one out, show the tree."""
    from vml.porcelain import demo as demo_mod
    from vml.porcelain import log as log_mod

    with progress_bar(not quiet, "demo") as progress:
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


# Command groups kept in their own modules register themselves on ``app``.
# One import line per module; keep this block at the end of the file.
# fmt: off
import vml.cli.forest  # noqa: E402
import vml.cli.sharing  # noqa: E402
import vml.cli.vmcmds  # noqa: E402, F401

# fmt: on


def main() -> None:
    """Console-script entry point."""
    app()
