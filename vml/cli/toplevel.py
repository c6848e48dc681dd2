"""The root command's own parts: its app, its global options, and one command alone.

``root`` attaches every command group to :func:`new_root`'s app for the
root's help, completion and nested commands (``vml vm init``).  A command
run (``vml commit ...``) needs its own group alone: :func:`one_command`
imports that module only (:data:`COMMANDS` says which), since importing
all six and their options cost ~15 ms of every start.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.main import get_command_name

from vml import __version__
from vml.cli.common import VMLGroup
from vml.cli.lookup import options
from vml.cli.render import out

#: The command groups, in their order in `vml --help` (modules of ``vml.cli``).
GROUP_MODULES = ("entries", "inspection", "names", "maintenance", "sharing", "vmcmds")

#: Each top-level command (not a nested group) -> its group's module; a test
#: holds it to what the groups register.
COMMANDS = {
    **dict.fromkeys(("init", "commit", "checkout", "restore", "demo"), "entries"),
    **dict.fromkeys(("log", "show", "status", "areas"), "inspection"),
    **dict.fromkeys(("branch", "tag"), "names"),
    **dict.fromkeys(("rm", "convert", "prune", "gc", "verify", "fsck"), "maintenance"),
    **dict.fromkeys(("clone", "fetch", "pull", "push"), "sharing"),
    **dict.fromkeys(("run", "stop"), "vmcmds"),
}


def new_root() -> typer.Typer:
    """The root app with its global options (``--repo``, ``--version``) and no command."""
    app = typer.Typer(
        name="vml",
        help="Git-style versioning for virtual machines: save, branch and restore VM states.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        cls=VMLGroup,
    )
    app.callback()(main_options)
    return app


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
    options.repo = repo
    _tune_allocator()
    # File names need not be UTF-8: one that is not is shown escaped, never
    # a crash half way through a listing.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def one_command(argv: list[str]) -> typer.Typer | None:
    """The root app holding only the command ``argv`` runs, or None when it needs the whole app.

    typer turns every command's signature into click parameters at each
    start, ~40 ms for all of them: a command run (``vml commit ...``)
    needs its own alone, and only its group's module.  The root's options
    before it are skipped; the root's help, ``--version``, completion, an
    unknown or nested command (``vml vm init``) get the whole app.
    """
    if any(k.startswith("_VML_COMPLETE") for k in os.environ):
        return None
    i = 0
    while i < len(argv) and argv[i] in ("--repo", "-R"):
        i += 2
    if i >= len(argv) or argv[i] not in COMMANDS:
        return None
    group = importlib.import_module(f"vml.cli.{COMMANDS[argv[i]]}")
    for info in group.commands.registered_commands:
        name = info.name or get_command_name(getattr(info.callback, "__name__", ""))
        if name == argv[i]:
            one = new_root()
            sub = typer.Typer()
            sub.registered_commands.append(info)
            one.add_typer(sub)
            return one
    return None
