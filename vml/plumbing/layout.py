"""An entry's layout: the files and folders it lists must fit in one folder tree.

A checkout writes every file of the entry's ``files`` and makes every
folder of its ``dirs``.  Some lists cannot be written whatever the area
holds: one path twice, a path that is both a file and a folder (files ``a``
and ``a/b``; folder ``a`` and file ``a``), a file saved from outside the
area (``vm.external_files``) whose recorded name leaves the area or is not
one of the entry's files.  Such an entry is malformed
(:func:`layout_problems`): a checkout refuses it before writing anything,
and ``vml verify`` and ``vml fsck`` name it.

Names that differ only in case, or only in Unicode normalisation, are
distinct on Linux file systems but one name on others (vfat, exFAT, NTFS,
APFS, ext4 folders with casefold): :func:`merged_names` lists them; a
checkout probes the area's file system and refuses an entry it would
merge, and verify and fsck mention them.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from vml.errors import AreaError, CorruptRepository, HostileRepository
from vml.plumbing.entries import EntryMeta, check_relpath, shown

EXTERNAL_DIR = ".external"

Fold = Callable[[str], str]


def _case(name: str) -> str:
    return name.casefold()


def _normal(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _both(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def _same(name: str) -> str:
    return name


def _clashes(files: Iterable[str], dirs: Iterable[str], fold: Fold) -> list[str]:
    """What cannot be written when names are compared after ``fold``."""
    out: list[str] = []
    by_key: dict[str, list[str]] = {}
    for f in files:
        by_key.setdefault(fold(f), []).append(f)
    for same in by_key.values():
        if len(same) > 1:
            if len(set(same)) == 1:
                out.append(f"it lists {shown(same[0])} {len(same)} times")
            else:
                out.append(f"{' and '.join(shown(x) for x in sorted(set(same)))} are one name")
    folders: dict[str, str] = {}
    for p in [*by_key.keys(), *(fold(d) for d in dirs)]:
        parts = p.split("/")
        for i in range(1, len(parts)):
            folders.setdefault("/".join(parts[:i]), p)
    for d in dirs:
        folders.setdefault(fold(d), fold(d))
    for key, same in sorted(by_key.items()):
        if key in folders:
            out.append(f"{shown(same[0])} is both a file and a folder")
    return out


def _external_problems(meta: EntryMeta, files: set[str]) -> list[str]:
    vm = meta.vm if isinstance(meta.vm, dict) else {}
    items = vm.get("external_files")
    if items is None:
        return []
    if not isinstance(items, list):
        return ["its list of files saved from outside the area is malformed"]
    out: list[str] = []
    for it in items:
        src = it.get("source") if isinstance(it, dict) else None
        path = it.get("path") if isinstance(it, dict) else None
        if not isinstance(src, str) or not isinstance(path, str) or not os.path.isabs(src):
            out.append(f"a file saved from outside the area is recorded as {it!r:.80}")
            continue
        try:
            check_relpath(path)
        except HostileRepository:
            out.append(f"the file saved from {shown(src)} is recorded outside the area")
            continue
        parts = path.split("/")
        if len(parts) != 3 or parts[0] != EXTERNAL_DIR or path not in files:
            out.append(
                f"the file saved from {shown(src)} is recorded as {shown(path)}, "
                f"not as one of its files under {EXTERNAL_DIR}/"
            )
    return out


def layout_problems(meta: EntryMeta) -> list[str]:
    """Why entry metadata ``meta`` cannot be checked out anywhere (empty: it can)."""
    files = [f.path for f in meta.files]
    return _clashes(files, meta.dirs, _same) + _external_problems(meta, set(files))


def merged_names(meta: EntryMeta, fold: Fold = _both) -> list[str]:
    """Clashes that appear only where names that differ in case or normalisation are one."""
    files = [f.path for f in meta.files]
    exact = set(_clashes(files, meta.dirs, _same))
    return [c for c in _clashes(files, meta.dirs, fold) if c not in exact]


def _folds(where: Path) -> Fold | None:
    """How the file system at ``where`` (a folder) merges names, probed; None: it does not."""
    probe = where / f".vml-probe-{os.getpid()}-a\u00e9"
    probe.touch()
    try:
        upper = where / f".VML-PROBE-{os.getpid()}-A\u00c9"
        decomposed = where / f".vml-probe-{os.getpid()}-ae\u0301"
        case, normal = os.path.lexists(upper), os.path.lexists(decomposed)
    finally:
        probe.unlink()
    if case and normal:
        return _both
    return _case if case else _normal if normal else None


def check_layout(meta: EntryMeta, name: str, area: Path | None = None) -> None:
    """Refuse an entry that cannot be written: malformed anywhere, or merged by ``area``'s file system.

    Call before anything is written: a malformed entry is the entry's fault
    (:class:`CorruptRepository`), not the area's.  The file system is probed
    (in ``<area>/.vml/``, or the nearest existing folder above a new area)
    only when the entry holds names that some file systems merge.
    """
    problems = layout_problems(meta)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptRepository(
            f"entry {name} is malformed: {problems[0]}{more}; nothing was written",
            "run `vml fsck` to see every problem; `vml rm --force` removes the entry",
        )
    if area is None or not merged_names(meta):
        return
    # The area's own folder when it exists (in .vml/, not among the user's
    # files), else the nearest folder above it: the file system it will be on.
    where = next(p for p in [area / ".vml", area, *area.parents] if p.is_dir())
    try:
        fold = _folds(where)
    except OSError:
        fold = None  # cannot probe (read-only?): the write itself will tell
    clashes = merged_names(meta, fold) if fold is not None else []
    if clashes:
        raise AreaError(
            f"the file system at {area} cannot hold entry {name}: {clashes[0]} there",
            "check it out onto a file system that tells such names apart (ext4, xfs, btrfs)",
        )
