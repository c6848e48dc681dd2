"""The ``vml`` command's entry point: ``vml.__main__`` and the console script run :func:`main`.

The command line itself (the root typer app, its options, the command
groups) is imported only when a command runs: building it costs typer and
the parameters of the command, which ``vml --version`` has no use for.  A
command run alone is built by ``toplevel`` from its own group; the whole
app (``root``) is for the root's help, completion and nested commands.
Nothing imports this module but ``vml.__main__`` and the console script.
"""

from __future__ import annotations

import os
import sys
import threading

from vml import __version__


def main() -> None:
    """Run the command line (``sys.argv``); exits through ``SystemExit`` as typer does."""
    argv = sys.argv[1:]
    if argv == ["--version"]:
        # What the root app's eager --version prints, without building the app.
        sys.stdout.write(f"vml {__version__}\n")
        return
    from vml.cli.toplevel import one_command

    one = one_command(argv)
    if one is None:
        from vml.cli.root import app

        one = app
    one()


def run() -> None:
    """Console-script and ``python -m vml`` entry point: :func:`main`, then a quick exit.

    A command that ended, well or with its one error line and exit code
    (a VML error, a usage error: ``nothing changed`` is one), has nothing
    left to do once its output is flushed: every file it wrote is closed
    and every thread joined (the commands shut their pools down; ``with``
    and ``finally`` blocks ran as the error went up), and VML registers no
    exit handlers.  Tearing the interpreter down (clearing ~800 modules,
    freeing every object) still took ~0.1 s of a later save's ~1.3 s, ~40
    ms of a save that found nothing changed, so the process leaves with
    ``os._exit`` instead.  An exception that escaped (a traceback), an exit
    without a number, or a thread still running take the ordinary way out.
    """
    try:
        main()
    except SystemExit as e:
        code = 0 if e.code is None else e.code
        if isinstance(code, int):
            _exit_now(code)
        raise
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Flush the standard streams and end the process at once with ``code``, when that is safe."""
    if threading.active_count() > 1:
        return  # someone else's work: the interpreter's exit joins it
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # a closed or broken stream: the ordinary exit reports it
    os._exit(code)
