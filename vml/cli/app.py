"""The ``vml`` command: the root typer app, its global options, and the command groups.

Each group of commands is a typer app of its own, in its own module
(``entries``, ``inspection``, ``names``, ``maintenance``, ``sharing``,
``vmcmds``), built on ``common`` and ``render``; this module only attaches
them.  Nothing imports this module but ``vml.__main__`` and the console
script.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Annotated

import typer

from vml import __version__
from vml.cli import entries, inspection, maintenance, names, sharing, vmcmds
from vml.cli.common import VMLGroup
from vml.cli.lookup import options
from vml.cli.render import out

app = typer.Typer(
    name="vml",
    help="Git-style versioning for virtual machines: save, branch and restore VM states.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=VMLGroup,
)

# In this order in `vml --help`.
for group in (entries, inspection, names, maintenance, sharing, vmcmds):
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


def main() -> None:
    """Console-script entry point."""
    app()
