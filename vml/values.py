"""Values people type, parsed and checked in one place: counts, sizes, entry numbers, names.

Every numeric value a command takes goes through one of these functions
(the CLI's parameter types in ``cli/types.py`` call them; plumbing calls
them for entry numbers in names and refs), so a sign, a zero, a fraction,
an exponent or a number too large for what it counts is refused the same
way everywhere: a :class:`~vml.errors.UsageError` (exit 2) naming the
range, before anything is read or written.  Only ASCII digits count as
digits (Python's ``int()`` also takes ``"٣"``, ``"1_000"`` and ``" +3"``).
"""

from __future__ import annotations

import re

from vml.errors import UsageError

#: Largest retention count (``--keep-last`` and friends): more than any repository holds.
MAX_COUNT = 1_000_000
#: Entry numbers run from E1 to this (18 digits: an int64, and far more than ever made).
MAX_ENTRY = 10**18 - 1
#: Largest size (bytes) any option takes: 1 PiB.
MAX_SIZE = 1 << 50

_DIGITS = re.compile(r"[0-9]+")
_SIZE = re.compile(r"([0-9]+)([KMGT]?)(?:I?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: ``E7``, ``e7`` or ``7``: the forms of an entry number.
ENTRY_FORM = re.compile(r"([Ee]?)([0-9]+)")


def shown(text: str) -> str:
    """``text`` as an error message quotes it: ``repr``, at most 40 characters."""
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def parse_count(text: str, what: str = "the count", minimum: int = 1) -> int:
    """A whole number from ``minimum`` to :data:`MAX_COUNT`, in decimal digits."""
    t = text.strip()
    if not _DIGITS.fullmatch(t) or len(t) > 7 or not minimum <= int(t) <= MAX_COUNT:
        raise UsageError(
            f"{what} takes a whole number from {minimum} to {MAX_COUNT}, not {shown(text)}",
            "write it in digits, e.g. 7",
        )
    return int(t)


def parse_size(text: str, what: str = "the size", minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """``1M``, ``256K``, ``1MiB``, ``4GB`` or a plain byte count, from ``minimum`` to ``maximum``."""
    m = _SIZE.fullmatch(text.strip())
    # 17 digits with a unit are far past any maximum; longer ones never reach int().
    value = int(m.group(1)) * _UNITS[m.group(2).upper()] if m and len(m.group(1)) <= 17 else None
    if value is None or not minimum <= value <= maximum:
        raise UsageError(
            f"{what} takes a size from {_units(minimum)} to {_units(maximum)}, not {shown(text)}",
            "write it like 1M, 256K or 1048576",
        )
    return value


def _units(n: int) -> str:
    """``1024T``, ``64K``, ``3``: a size as :func:`parse_size` reads it."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


#: Largest VM memory ``--memory`` takes: 16 TiB, in MiB.
MAX_MEMORY_MIB = 1 << 24
#: Longest wait any option takes: a day.
MAX_SECONDS = 86400
_SECONDS = re.compile(r"([0-9]{1,6})(?:\.([0-9]{1,6}))?")


def parse_memory_mib(text: str, what: str = "--memory") -> int:
    """A VM's memory: ``256M``, ``2G``, or a plain number of MiB; whole MiB, 1 MiB to 16 TiB."""
    t = text.strip()
    try:
        nbytes = parse_size(t + "M" if t.isascii() and t.isdigit() else t, what)
    except UsageError:
        nbytes = 0
    if not 1 <= nbytes >> 20 <= MAX_MEMORY_MIB or nbytes % (1 << 20):
        raise UsageError(
            f"{what} takes a whole number of MiB from 1M to 16T, not {shown(text)}",
            "write it like 512M or 2G",
        )
    return nbytes >> 20


def parse_seconds(text: str, what: str = "the time") -> float:
    """A positive number of seconds, up to a day: ``60``, ``2.5``."""
    m = _SECONDS.fullmatch(text.strip())
    value = float(m.group(0)) if m else 0.0
    if not 0 < value <= MAX_SECONDS:
        raise UsageError(
            f"{what} takes a number of seconds above 0 and up to {MAX_SECONDS}, not {shown(text)}",
            "write it like 60 or 2.5",
        )
    return value


def entry_number(name: str) -> int | None:
    """The number ``E7``, ``e7`` or ``7`` names; None when ``name`` is no entry number.

    ``E0`` and an ``E`` followed by more digits than any entry number has are
    refused (:class:`UsageError`).  Bare digits out of range give None: they
    may still be a commit id prefix.
    """
    m = ENTRY_FORM.fullmatch(name.strip())
    if m is None:
        return None
    digits = m.group(2)
    if len(digits) <= 18 and 1 <= int(digits) <= MAX_ENTRY:
        return int(digits)
    if m.group(1):
        raise UsageError(
            f"{shown(name.strip())} is out of range: entries are numbered from E1 to E{MAX_ENTRY}",
            "run `vml log --all` to list the entries",
        )
    return None


#: What a tag, branch or remote name is made of: letters, digits, '_', '-' and '.'
#: (not first); a control character, a space or a bidi mark never gets in.
_NAME = re.compile(r"(?!\.)[\w.-]+")
#: A name that may be read as a commit id (prefix).
COMMIT_ID_FORM = re.compile(r"[0-9a-fA-F]{4,40}")


def check_plain_name(name: str, kind: str, *, id_like: bool = True) -> None:
    """Refuse a ``kind`` name outside the rule its message states.

    With ``id_like`` false (tags and branches), a name that reads as an
    E-number or a commit id is refused too: it would be ambiguous.
    """
    bad = (
        not _NAME.fullmatch(name)
        or name.startswith("-")
        or ".." in name
        or name.endswith((".", ".lock"))
        or (not id_like and (ENTRY_FORM.fullmatch(name) or COMMIT_ID_FORM.fullmatch(name)))
    )
    if bad:
        rule = "use letters, digits, '-', '_' and '.' (not first or last)"
        if not id_like:
            rule += ", not an E-number or 4 to 40 hex digits (a commit id)"
        raise UsageError(f"{shown(name)} is not a valid {kind} name", rule)


def check_name_text(name: str, what: str, remedy: str) -> str:
    """Refuse an empty or whitespace-only name or path; return it as given."""
    if not name.strip():
        raise UsageError(f"{what} is empty", remedy)
    return name
