"""One error hierarchy for every layer.

Each error carries what happened (``message``), what the user can do about it
(``remedy``) and the process exit code the CLI uses.  Only the CLI prints
them, in one place; plumbing and porcelain just raise.  Exit codes are stable
and documented in ``docs/FORMAT.md`` so scripts can branch on them (the idea
is borg's: an error class is an exit code).
"""

from __future__ import annotations


class VMLError(Exception):
    """Base of every error VML reports to a user."""

    exit_code: int = 1
    default_remedy: str = ""

    def __init__(self, message: str, remedy: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.remedy = self.default_remedy if remedy is None else remedy

    def __str__(self) -> str:
        if self.remedy:
            return f"{self.message}; {self.remedy}"
        return self.message


class UsageError(VMLError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class RepositoryNotFound(VMLError):
    """No repository at the given place, or not one VML can use."""

    exit_code = 3
    default_remedy = "run `vml init` to create one, or pass --repo PATH"


class UnknownEntry(VMLError):
    """An entry name that matches no entry."""

    exit_code = 4
    default_remedy = "run `vml log --all` to list the entries"


class AmbiguousEntry(UnknownEntry):
    """A name (e.g. a short commit id) that matches more than one entry."""

    default_remedy = "give more characters of the commit id, or use the E-number"


class AreaError(VMLError):
    """The working area is missing, unusable, or would be damaged."""

    exit_code = 5


class DirtyArea(AreaError):
    """The area has changes that are not saved in any entry."""

    default_remedy = "save them with `vml commit`, or pass --force to overwrite them"


class VMRunning(AreaError):
    """The VM in the area appears to be running (lock files or held locks)."""

    exit_code = 6
    default_remedy = "shut down or suspend the VM first"


class FileChanged(AreaError):
    """A file changed while VML was reading it."""

    exit_code = 6
    default_remedy = "stop whatever writes to it (is the VM running?) and try again"


class RemoteError(VMLError):
    """A remote could not be reached, or refused what was asked."""

    exit_code = 1


class NothingToCommit(VMLError):
    """The area is identical to its entry; no new entry was made."""

    exit_code = 1
    default_remedy = "pass --allow-empty to make an entry anyway"


class CorruptRepository(VMLError):
    """An object is missing, damaged or malformed."""

    exit_code = 7
    default_remedy = "run `vml fsck` to see which entries are affected"


class NewerFormat(CorruptRepository):
    """An object written by a newer VML in a format this one cannot read.

    A kind of :class:`CorruptRepository`, so every reader that lists an
    unreadable entry and goes on does so for these too; the message says
    which format and that upgrading VML reads it.
    """

    default_remedy = "upgrade vml to read it"


class HostileRepository(CorruptRepository):
    """Repository data that would write outside the area or exhaust resources."""

    default_remedy = "this repository is not safe to use; do not check it out"


class RepositoryBusy(VMLError):
    """Another VML process holds the repository or area lock."""

    exit_code = 8
    default_remedy = "wait for the other vml command to finish, then try again"


class ConcurrentChange(RepositoryBusy):
    """Another command changed what this one relied on; nothing of this one was kept."""

    default_remedy = "run the command again"


class NoSpace(VMLError):
    """The disk filled up; nothing was changed."""

    exit_code = 9
    default_remedy = "free some space and try again"


class VMControlError(VMLError):
    """Starting, stopping or talking to a VM under ``vml run`` failed."""

    exit_code = 10
    default_remedy = "see the area's .vml/run/qemu.log"


class QMPError(VMControlError):
    """QEMU's QMP socket did not answer, or QEMU refused a command."""


class QMPTimeout(QMPError):
    """QEMU did not answer on its QMP socket in time."""

    default_remedy = "the VM may be hung: `vml stop --kill` ends it"


class IncompatibleState(VMControlError):
    """A saved running state that this QEMU cannot load."""

    default_remedy = (
        "run it with the QEMU that saved it, or boot afresh with `vml run --discard-state`"
    )


def newer_or_unknown(what: str, version: object, known: int) -> CorruptRepository:
    """The error for ``what`` whose format ``version`` is not ``known`` (the newest this VML reads).

    A plausible larger version number was written by a newer VML: say so, so
    that the user upgrades instead of hunting for damage.  Anything else
    (not a number, older, absurd) is an unknown format.
    """
    if isinstance(version, int) and not isinstance(version, bool) and known < version < 1000:
        return NewerFormat(f"{what} format {version} is newer than this vml understands")
    return CorruptRepository(f"{what} has an unknown format")
