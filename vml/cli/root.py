"""The ``vml`` command line: the root typer app, its global options, and the command groups.

Each group of commands is a typer app of its own, in its own module
(``entries``, ``inspection``, ``names``, ``maintenance``, ``sharing``,
``vmcmds``), built on ``common`` and ``render``; this module only attaches
them.  Nothing imports this module but the entry point, ``app.main``, once
it knows that a command runs.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.main import get_command_name

from vml import __version__
from vml.cli import entries, inspection, maintenance, names, sharing, vmcmds
from vml.cli.common import VMLGroup
from vml.cli.lookup import options
from vml.cli.render import out

# In this order in `vml --help`.
GROUPS = (entries, inspection, names, maintenance, sharing, vmcmds)


def _root() -> typer.Typer:
    return typer.Typer(
        name="vml",
        help="Git-style versioning for virtual machines: save, branch and restore VM states.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        cls=VMLGroup,
    )


app = _root()
for group in GROUPS:
    app.add_typer(group.commands)


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
    needs its own alone.  The root's options before it are skipped; the
    root's help, ``--version``, completion, an unknown or nested command
    (``vml vm init``) get the whole app.
    """
    if any(k.startswith("_VML_COMPLETE") for k in os.environ):
        return None
    i = 0
    while i < len(argv) and argv[i] in ("--repo", "-R"):
        i += 2
    if i >= len(argv) or argv[i].startswith("-"):
        return None
    for group in GROUPS:
        for info in group.commands.registered_commands:
            name = info.name or get_command_name(getattr(info.callback, "__name__", ""))
            if name == argv[i]:
                one = _root()
                one.registered_callback = app.registered_callback
                sub = typer.Typer()
                sub.registered_commands.append(info)
                one.add_typer(sub)
                return one
    return None
