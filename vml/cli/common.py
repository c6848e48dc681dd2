"""What every command of the ``vml`` CLI shares: the contract each one keeps.

- errors: :func:`handled` turns a :class:`~vml.errors.VMLError` (and a few
  OS errors) into one line on stderr and the error's exit code
  (``docs/FORMAT.md``, "Exit codes");
- the repository: :func:`opened` finds it (``lookup``: ``--repo``,
  ``$VML_REPO``, the area's own, the current area's, the user default),
  numbers entries pushed into it, and closes it however the command ends;
- the options several commands take, as shared ``Annotated`` types.

Command modules (one typer app per command group) import this module and
``render``, never ``root.py``: the root app imports them.  They import the
porcelain inside each command, so ``vml`` starts without loading it.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer._click import exceptions as click_errors  # typer's own click (pinned: pyproject)
from typer.core import TyperGroup

from vml.cli import completion
from vml.cli.lookup import repository_path
from vml.cli.params import Count, EntryName, Folder, Refused
from vml.cli.plain import escape
from vml.cli.render import err, only_errors, out, report_error, warnings_said_once
from vml.errors import NoSpace, UsageError, VMLError

if TYPE_CHECKING:
    from vml.plumbing.repository import Repository

F = TypeVar("F", bound=Callable[..., Any])


def handled(fn: F) -> F:
    """Run a command, turning VML errors (and a few OS ones) into one line and an exit code.

    A command's ``quiet`` (``-q``) and ``json_`` (``--json``) parameters mean
    the same everywhere: nothing on stdout but the JSON document, no progress
    bar; errors and warnings still go to stderr.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with (
                warnings_said_once(),
                only_errors(bool(kwargs.get("quiet")) or bool(kwargs.get("json_"))),
            ):
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


class VMLGroup(TyperGroup):
    """The root command: what the command line itself gets wrong is one line too, exit 2.

    click reports a missing argument, an unknown option or a value its
    type refuses with the usage and a framed box; VML says it in one line,
    like every other error, with the command's ``--help`` as the remedy.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; see the class docstring."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except click_errors.NoArgsIsHelpError:
            sys.exit(2)  # the help is printed already
        except Refused as e:
            report_error(e.error)
            sys.exit(e.error.exit_code)
        except click_errors.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "vml"
            message = e.format_message().rstrip(".")
            report_error(UsageError(message[:1].lower() + message[1:], f"see `{where} --help`"))
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("vml: aborted; earlier entries are intact", style="red")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# --- the repository a command works on ---------------------------------------


@contextmanager
def opened(area: Path | None = None) -> Iterator[Repository]:
    """The command's repository, closed again however the command ends."""
    from vml.plumbing.repository import open_repository

    repo = open_repository(repository_path(area))
    try:
        _number_pushed(repo)
        yield repo
    finally:
        repo.close()


def _number_pushed(repo: Repository) -> None:
    """Entries `vml push` sent here get their E-numbers on first use (see ``number_pushed``)."""
    from vml.plumbing.refs import unnumbered_pushes

    if not unnumbered_pushes(repo):
        return
    from vml.porcelain.fetch import number_pushed

    try:
        made = number_pushed(repo)
    except (VMLError, OSError) as e:  # a read-only or busy repository: still usable as it is
        err.print(
            f"vml: note: entries pushed here have no E-number yet ({escape(str(e))}); "
            "run `vml fetch` where you may write"
        )
        return
    if made:
        names = ", ".join(e.entry for e in made)
        out.print(f"numbered the entries pushed here: {names}")


# --- options several commands share ------------------------------------------


def flag(name: str, help: str, short: str | None = None) -> Any:
    """A yes/no option (``--force``, ``-f``); it is off unless given."""
    return typer.Option(name, *([short] if short else []), help=help)


Quiet = Annotated[bool, flag("--quiet", "Print nothing but errors (no progress bar).", "-q")]
Json = Annotated[bool, flag("--json", "Print one JSON document (docs/JSON.md), nothing else.")]
RemoteArg = Annotated[
    str | None,
    typer.Argument(
        help="The remote (default: origin, or the only one).", autocompletion=completion.remotes
    ),
]


def folder_argument(help: str) -> Any:
    """A folder argument: never empty or blank (that once meant the current folder)."""
    return typer.Argument(help=help, click_type=Folder())


def entry_argument(help: str = "Entry: E3, 3, a tag, a branch or a commit id.") -> Any:
    """An entry name argument (or a list of them), checked as it is read."""
    return typer.Argument(
        help=help,
        click_type=EntryName(),
        show_default=False,
        autocompletion=completion.entries,
    )


def entry_option(name: str, help: str) -> Any:
    """An option naming an entry (``--base``)."""
    return typer.Option(
        name,
        help=help,
        click_type=EntryName(),
        show_default=False,
        autocompletion=completion.entries,
    )


def count_option(name: str, help: str, short: str | None = None) -> Any:
    """An option counting things, from 1 (``--keep-last``); leaving it out means none."""
    return typer.Option(
        name, *([short] if short else []), help=help, click_type=Count(), show_default=False
    )


AreaArg = Annotated[Path, folder_argument("The working area (a folder holding one VM).")]
EntryArg = Annotated[str, entry_argument()]


def qmp_option(help: str) -> Any:
    """``--qmp SOCKET``: the QMP socket of a QEMU VML did not start."""
    return typer.Option(
        "--qmp", help=help, click_type=Folder(), show_default=False, metavar="SOCKET"
    )


#: ``--connect URI``: the libvirt daemon a running domain is looked for in.
Connect = Annotated[
    str | None,
    typer.Option("--connect", "-c", help="libvirt URI (default qemu:///system)."),
]
