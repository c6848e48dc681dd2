"""``vml clone``: a new repository holding every entry of a remote one.

The clone keeps the remote's E-numbers (it starts empty, so they are free);
entries the remote only holds as shared refs get numbers after them.  The
block and page size are taken from the entries' manifests so new entries
made here share blocks with the ones that came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vml.errors import UsageError
from vml.plumbing import arrivals
from vml.plumbing import refs as refs_mod
from vml.plumbing import remotes as remotes_mod
from vml.plumbing.repository import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    init_repository,
    is_repository,
    make_folder,
    undo_made,
    write_config,
)
from vml.porcelain.fetch import FetchResult, fetch_into
from vml.porcelain.remote import normalise_url
from vml.progress import ProgressFn, no_progress
from vml.records import Record
from vml.values import ENTRY_FORM


@dataclass
class CloneResult(Record):
    """What ``vml clone`` made."""

    path: str
    url: str
    block_size: int
    fetch: FetchResult
    branches: list[str] = field(default_factory=list)


def default_path(url: str) -> Path:
    """``lab-vms`` for ``ssh://host/srv/lab-vms.git`` (git's rule)."""
    tail = re.split(r"[/:]", url.rstrip("/"))[-1]
    tail = tail.removesuffix(".git") or "vml-clone"
    return Path(tail)


def clone(
    url: str,
    path: Path | None = None,
    *,
    ssh_command: str | None = None,
    progress: ProgressFn = no_progress,
) -> CloneResult:
    """Clone the VML repository at ``url`` into ``path``."""
    url = normalise_url(url)
    target = path if path is not None else default_path(url)
    if is_repository(target) or (target.exists() and any(target.iterdir())):
        raise UsageError(f"{target} exists and is not empty", "choose a new or empty folder")
    folders = make_folder(target)
    try:
        repo = init_repository(target, DEFAULT_BLOCK_SIZE)
    except BaseException:
        undo_made(target, [], folders)  # init removed its own files
        raise
    ours = [p.name for p in target.iterdir()]  # what the clone owns: the folder was empty
    try:
        remotes_mod.add_remote(repo, "origin", url)
        res = fetch_into(
            repo,
            "origin",
            url,
            keep_numbers=True,
            ssh_command=ssh_command,
            progress=progress,
        )
        table = refs_mod.read_refs(repo)
        made: list[str] = []
        moves: list[refs_mod.RefMove] = []
        with repo.lock():
            for b, entry in sorted(res.branches.items()):
                commit = refs_mod.resolve_name(repo, entry, table)
                if b not in table.branches and not ENTRY_FORM.fullmatch(b):
                    moves.append(refs_mod.create(refs_mod.BRANCH_PREFIX + b.encode(), commit))
                    made.append(b)
            refs_mod.move_refs(repo, moves)
        sizes = arrivals.block_size_of(repo, sorted(table.entries.values()))
        block_size = repo.block_size
        if sizes is not None and MIN_BLOCK_SIZE <= sizes[0] <= MAX_BLOCK_SIZE:
            block_size = sizes[0]
            cfg = repo.git.get_config()
            cfg.set((b"vml",), b"blockSize", str(sizes[0]).encode())
            cfg.set((b"vml",), b"pageSize", str(sizes[1]).encode())
            write_config(cfg)
    except BaseException:
        repo.close()
        # What another program put into the folder meanwhile stays (and so does the folder, then).
        undo_made(target, ours, folders)
        raise
    repo.close()
    return CloneResult(str(target), url, block_size, res, made)
