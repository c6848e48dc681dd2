"""``vml remote add|remove|list``: name the repositories entries are shared with."""

from __future__ import annotations

from dataclasses import dataclass

from vml.plumbing import remotes as remotes_mod
from vml.plumbing.repository import Repository
from vml.porcelain.clone import normalise_url
from vml.records import Record


@dataclass
class RemoteInfo(Record):
    """One configured remote."""

    name: str
    url: str


def add(repo: Repository, name: str, url: str) -> RemoteInfo:
    """Configure remote ``name`` at ``url`` (local paths are made absolute)."""
    with repo.lock():
        url = normalise_url(url)
        remotes_mod.add_remote(repo, name, url)
    return RemoteInfo(name, url)


def remove(repo: Repository, name: str) -> RemoteInfo:
    """Forget remote ``name`` and what was tracked from it; entries stay."""
    with repo.lock():
        url = remotes_mod.remote_url(repo, name)
        remotes_mod.remove_remote(repo, name)
    return RemoteInfo(name, url)


def list_remotes(repo: Repository) -> list[RemoteInfo]:
    """Every configured remote."""
    return [RemoteInfo(n, u) for n, u in remotes_mod.list_remotes(repo).items()]
