"""What several commands share: finding the repository, naming entries, reading them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vml.errors import AreaError
from vml.plumbing.areas import folder_key, load_state
from vml.plumbing.refs import RefTable
from vml.plumbing.repository import Repository
from vml.progress import ProgressFn as ProgressFn  # re-exported for the commands
from vml.progress import no_progress as no_progress


def workers() -> int:
    """Threads for hashing and compression: one per core, at least two."""
    import os

    return max(2, len(os.sched_getaffinity(0)))


def make_pool() -> ThreadPoolExecutor:
    """The thread pool hashing, compression and inflation run in."""
    return ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="vml")


def find_repository(
    explicit: Path | None, env: str | None, areas: Sequence[Path], default: Path
) -> Path:
    """Where the repository is: ``--repo``, ``$VML_REPO``, the first of ``areas``' own, the default.

    The CLI passes the area a command works on, then the current folder: from
    inside an area, `vml checkout E1 ../copy` uses the area's repository
    although the new folder has none yet.
    """
    if explicit is not None:
        return explicit
    if env:
        return Path(env)
    for area in areas:
        try:
            state = load_state(area)
        except AreaError:
            state = None
        if state is not None and state.repository:
            return Path(state.repository)
    return default


def label(table: RefTable, commit: bytes | None) -> str | None:
    """``E3`` for a commit with an entry number, else a short commit id."""
    return table.label(commit)


def check_area_path(repo: Repository, area: Path) -> None:
    """Refuse an area inside the repository or a repository inside the area.

    Compared by device and inode as well as by path, so that a bind mount
    or a link does not hide one inside the other.
    """
    a = area.resolve()
    r = repo.path.resolve()
    rkey = folder_key(r)
    existing = next((p for p in [a, *a.parents] if p.exists()), a)
    if (
        a == r
        or r in a.parents
        or any(folder_key(p) == rkey for p in [existing, *existing.parents])
        or _folder_below(folder_key(existing), r)
    ):
        raise AreaError(
            f"the area {area} lies inside the repository {repo.path}",
            "keep working areas outside the repository folder",
        )
    akey = folder_key(a) if a.exists() else None
    if a in r.parents or (akey is not None and any(folder_key(p) == akey for p in r.parents)):
        raise AreaError(
            f"the repository {repo.path} lies inside the area {area}",
            "move the repository out of the area (or the area away from it)",
        )


def _folder_below(key: tuple[int, int], root: Path) -> bool:
    """True when a folder below ``root`` is the folder ``key`` (reached another way).

    A repository holds a few hundred folders at most (objects/xx, refs,
    vml): walking them costs about a millisecond.
    """
    for d, dirs, _files in os.walk(root):
        for name in dirs:
            try:
                if folder_key(Path(d, name)) == key:
                    return True
            except OSError:
                continue
    return False


def foreign_folders(repo: Repository) -> dict[tuple[int, int], str]:
    """Folders a scan of an area must never enter: the repository's."""
    return {folder_key(repo.path): f"the repository {repo.path}"}
