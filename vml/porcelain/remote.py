"""``vml remote add|remove|list``: name the repositories entries are shared with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vml.plumbing import remotes as remotes_mod
from vml.plumbing.repository import Repository
from vml.records import Record
from vml.values import check_name_text


@dataclass
class RemoteInfo(Record):
    """One configured remote."""

    name: str
    url: str


def normalise_url(url: str) -> str:
    """Local paths become absolute, so the remote works from any folder.

    An empty or blank URL is refused: as a path it would be the current folder.
    """
    check_name_text(url, "the URL", "give a path or a URL, e.g. ssh://server/srv/vms.git")
    if "://" not in url and Path(url).exists():
        return str(Path(url).resolve())
    return url


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
