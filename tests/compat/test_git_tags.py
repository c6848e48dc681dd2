"""Tags made by git itself: loose or packed, annotated or lightweight, a tag of a tag.

Every kind must mean the same to VML as its own tag: the entry it names
(peeled through every tag object), kept by ``rm`` and ``prune``, moved by
``convert``, clean under ``vml fsck``, ``vml verify`` and ``git fsck``.
Loose annotated tags were once read as the tag object's id (only packed
ones were peeled), so fsck called them broken and a rewrite left them on
the old commit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import edit, make_area, need
from vml.plumbing import refs as refs_mod
from vml.plumbing.repository import Repository, init_repository, open_repository
from vml.plumbing.retention import Policy
from vml.porcelain.commit import commit
from vml.porcelain.convert import convert
from vml.porcelain.fsck import fsck
from vml.porcelain.gc import gc
from vml.porcelain.prune import prune
from vml.porcelain.rm import rm
from vml.porcelain.verify import verify

KINDS = ["lightweight", "annotated", "annotated-packed", "tag-of-tag", "tag-of-tag-packed"]


def _git(repo: Path, *args: str) -> str:
    res = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return res.stdout.strip()


def tagged(root: Path, kind: str) -> tuple[Repository, bytes]:
    """E1..E3 in one area; git tags E2 as ``t`` the ``kind`` way. Returns E2's commit."""
    need("git")
    repo = init_repository(root / "repo", 64 << 10)
    a = root / "area"
    make_area(a)
    for i in range(3):
        edit(a / "disk.img", 70_000 * i + 1000, bytes([i + 1]) * 5000)
        commit(repo, a, message=f"state {i}")
    e2 = refs_mod.read_refs(repo).entries[2]
    if kind == "lightweight":
        _git(repo.path, "tag", "t", e2.hex())
    elif kind.startswith("annotated"):
        _git(repo.path, "tag", "-a", "t", "-m", "an annotated tag", e2.hex())
    else:
        _git(repo.path, "tag", "-a", "inner", "-m", "inner", e2.hex())
        _git(repo.path, "tag", "-a", "t", "-m", "a tag of a tag", "inner")
    if kind.endswith("packed"):
        _git(repo.path, "pack-refs", "--all")
    repo.close()
    return open_repository(root / "repo"), e2


def _git_fsck_clean(repo: Repository) -> None:
    res = subprocess.run(
        ["git", "fsck", "--full", "--strict"], cwd=repo.path, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_a_git_tag_names_the_entry_and_checks_clean(tmp_path: Path, kind: str) -> None:
    repo, e2 = tagged(tmp_path, kind)
    table = refs_mod.read_refs(repo)
    assert table.tags["t"] == e2
    assert refs_mod.resolve_name(repo, "t") == e2
    assert fsck(repo).clean, fsck(repo).problems
    res = verify(repo, ["t"])
    assert res.clean and res.checked == ["E2"], res
    gc(repo)
    assert verify(repo, [], all_entries=True).clean
    _git_fsck_clean(repo)
    repo.close()


@pytest.mark.parametrize("kind", KINDS)
def test_rm_and_prune_keep_an_entry_a_git_tag_names(tmp_path: Path, kind: str) -> None:
    from vml.errors import VMLError

    repo, _e2 = tagged(tmp_path, kind)
    with pytest.raises(VMLError, match="tag t names it"):
        rm(repo, ["E2"])
    res = prune(repo, Policy(last=1))
    assert 2 in refs_mod.read_refs(repo).entries, res
    rm(repo, ["E2"], force=True)  # the tag goes with it
    table = refs_mod.read_refs(repo)
    assert "t" not in table.tags and 2 not in table.entries
    assert fsck(repo).clean
    _git_fsck_clean(repo)
    repo.close()


@pytest.mark.parametrize("kind", KINDS)
def test_convert_moves_a_git_tag_to_the_rewritten_entry(tmp_path: Path, kind: str) -> None:
    repo, e2 = tagged(tmp_path, kind)
    convert(repo, "E2", "full")
    table = refs_mod.read_refs(repo)
    assert table.entries[2] != e2
    assert table.tags["t"] == table.entries[2]
    assert fsck(repo).clean, fsck(repo).problems
    gc(repo)
    assert verify(repo, [], all_entries=True, read_data=True).clean
    _git_fsck_clean(repo)
    repo.close()


@pytest.mark.parametrize("how", [["-a", "-m", "moved"], []], ids=["annotated", "lightweight"])
def test_a_packed_tag_git_moved_since_names_its_new_entry(tmp_path: Path, how: list[str]) -> None:
    """git moves a packed tag by writing a loose ref over it; the packed line, and its
    peeled line, stay behind.  The loose ref is the tag: the stale peel is not."""
    repo, e2 = tagged(tmp_path, "annotated-packed")
    table = refs_mod.read_refs(repo)
    assert table.tags["t"] == e2
    e3 = table.entries[3]
    _git(repo.path, "tag", "-f", *how, "t", e3.hex())
    repo.close()
    repo = open_repository(tmp_path / "repo")
    assert refs_mod.read_refs(repo).tags["t"] == e3
    assert refs_mod.resolve_name(repo, "t") == e3
    from vml.errors import VMLError

    with pytest.raises(VMLError, match="tag t names it"):
        rm(repo, ["E3"])
    rm(repo, ["E2"])  # no tag names it any more
    assert fsck(repo).clean, fsck(repo).problems
    repo.close()
