"""``vml tag`` and ``vml branch``: names for entries, resolution, following branches."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import edit
from vml.errors import UnknownEntry, UsageError
from vml.plumbing import refs
from vml.plumbing.repository import Repository
from vml.porcelain.checkout import checkout
from vml.porcelain.commit import commit
from vml.porcelain.names import create_branch, create_tag, delete_name, list_names


def test_tags(repo: Repository, area: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="holds none"):
        create_tag(repo, "t", None, area)
    e1 = commit(repo, area)
    edit(area / "disk.img", 0, b"x")
    e2 = commit(repo, area)
    info = create_tag(repo, "v1", "E1", None)
    assert (info.name, info.entry, info.commit) == ("v1", "E1", e1.commit)
    here = create_tag(repo, "now", None, area)  # the area's own entry
    assert here.entry == "E2"
    with pytest.raises(UsageError, match="exists already"):
        create_tag(repo, "v1", "E2", None)
    with pytest.raises(UsageError, match="not a valid tag"):
        create_tag(repo, "E2", "E2", None)
    with pytest.raises(UnknownEntry):
        create_tag(repo, "v9", "E9", None)
    assert [(t.name, t.entry) for t in list_names(repo, "tag")] == [("now", "E2"), ("v1", "E1")]
    res = checkout(repo, "v1", tmp_path / "out")
    assert res.commit == e1.commit and res.branch is None
    assert delete_name(repo, "tag", "v1").entry == "E1"
    with pytest.raises(UnknownEntry):
        refs.resolve_name(repo, "v1")
    with pytest.raises(UsageError, match="no tag"):
        delete_name(repo, "tag", "v1")
    assert refs.resolve_name(repo, "E1").hex() == e1.commit  # the entry stays
    assert e2.commit == refs.resolve_name(repo, "now").hex()


def test_branches(repo: Repository, area: Path, tmp_path: Path) -> None:
    e1 = commit(repo, area)
    info = create_branch(repo, "main", None, area)
    assert info.current and info.entry == "E1"
    other = create_branch(repo, "side", "E1", tmp_path / "elsewhere")
    assert not other.current
    with pytest.raises(UsageError, match="exists already"):
        create_branch(repo, "main", "E1", None)
    names = list_names(repo, "branch", area)
    assert [(b.name, b.current) for b in names] == [("main", True), ("side", False)]
    edit(area / "disk.img", 0, b"x")
    e2 = commit(repo, area)
    table = refs.read_refs(repo)
    assert table.branches["main"].hex() == e2.commit
    assert table.branches["side"].hex() == e1.commit
    # a commit prefix, an E-number, a number, a branch all name entries
    for name in ("main", "E2", "2", e2.commit[:7], e2.commit):
        assert refs.resolve_name(repo, name).hex() == e2.commit
    delete_name(repo, "branch", "main")
    edit(area / "disk.img", 0, b"y")
    e3 = commit(repo, area)  # the branch is gone; saving still works
    assert e3.parent == "E2" and e3.branch is None
    assert "main" not in refs.read_refs(repo).branches
