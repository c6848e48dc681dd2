"""An area moves the branch it follows only from where it last saw it."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import edit
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import load_state
from vml.plumbing.repository import Repository
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit
from vml.porcelain.names import create_branch
from vml.porcelain.rm import rm


def _tip(repo: Repository, name: str) -> str | None:
    return refs_mod.read_refs(repo).label(refs_mod.read_refs(repo).branches.get(name))


def test_two_areas_on_one_branch(repo: Repository, area: Path, tmp_path: Path) -> None:
    commit(repo, area)
    create_branch(repo, "main", "E1", area)
    other = tmp_path / "other"
    checkout(repo, "main", other)
    edit(area / "disk.img", 0, b"first line of work")
    e2 = commit(repo, area)
    assert e2.branch == "main" and e2.branch_moved_on is None and _tip(repo, "main") == "E2"
    edit(other / "disk.img", 0, b"second line of work")
    e3 = commit(repo, other)
    # The other area saw main at E1; it moved on to E2: never backwards to E3's line.
    assert _tip(repo, "main") == "E2"
    assert e3.branch is None and e3.branch_moved_on == "main" and e3.parent == "E1"
    st = load_state(other)
    assert st is not None and st.branch is None
    edit(area / "disk.img", 100, b"more")
    assert commit(repo, area).branch == "main" and _tip(repo, "main") == "E4"


def test_restore_then_save_moves_the_branch_the_area_owns(repo: Repository, area: Path) -> None:
    commit(repo, area)
    create_branch(repo, "main", "E1", area)
    edit(area / "disk.img", 0, b"x")
    commit(repo, area)
    restore(repo, "E1", area)
    edit(area / "disk.img", 0, b"y")
    e3 = commit(repo, area)
    # This area put main at E2 itself: going back and saving branches main there.
    assert e3.parent == "E1" and e3.branch == "main" and _tip(repo, "main") == "E3"


def test_a_rewrite_keeps_the_area_on_its_branch(repo: Repository, area: Path) -> None:
    commit(repo, area)
    edit(area / "disk.img", 0, b"x")
    commit(repo, area)
    create_branch(repo, "main", "E2", area)
    rm(repo, ["E1"])  # E2 gets a new commit; main and the area follow it
    edit(area / "disk.img", 0, b"y")
    e3 = commit(repo, area)
    assert e3.branch == "main" and _tip(repo, "main") == "E3"
