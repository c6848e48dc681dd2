"""The ``vml`` command's entry point: ``vml.__main__`` and the console script run :func:`main`.

The command line itself (the root typer app, its options, the command
groups) is ``root``, imported only when a command runs: building it costs
typer, rich and the parameters of the command (~0.2 s of CPU for the whole
app), which ``vml --version`` has no use for.  Nothing imports this module
but ``vml.__main__`` and the console script.
"""

from __future__ import annotations

import sys

from vml import __version__


def main() -> None:
    """Console-script entry point."""
    argv = sys.argv[1:]
    if argv == ["--version"]:
        # What the root app's eager --version prints, without building the app.
        sys.stdout.write(f"vml {__version__}\n")
        return
    from vml.cli.root import app, one_command

    (one_command(argv) or app)()
