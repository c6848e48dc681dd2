"""A repository an earlier VML's killed rewrite left broken is named by fsck and mended by gc --repair.

Before the rewrite journal (#14), a ``vml convert``, ``rm`` or ``prune``
killed between its name moves could leave an area holding a rewritten
commit that no E-number names, or an entry whose parent is such a commit.
Those commits are whole entries (their ``VML-Entry`` trailer names the
number they were saved as): ``vml gc --repair`` numbers them, parents
first, so every area and every parent names an entry again, and nothing
is pointed anywhere else.  The states are built here by hand: a finished
convert whose refs are put back where a kill left them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import edit
from tests.reliability.helpers import vml
from tests.reliability.test_killed_rewrites import scenario, shape
from vml.plumbing import refs as refs_mod
from vml.plumbing.areas import load_state, lock_area, save_state
from vml.plumbing.forest import load_forest
from vml.plumbing.journal import Step, write_journal
from vml.plumbing.packreader import PackReader
from vml.plumbing.renumber import Unnamed, find_unnamed, number_unnamed
from vml.plumbing.repository import Repository, open_repository
from vml.porcelain.convert import convert


def _refs(repo: Path) -> dict[str, str]:
    out = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname) %(objectname)"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split() for line in out.splitlines())


def broken(root: Path, case: str) -> Path:
    """The scenario with ``convert E2 --to full`` killed where an earlier VML left ``case``.

    ``areas``: both areas moved to the rewritten E4 and E2, no ref moved.
    ``parent``: every name moved but E2's: E3's parent is the rewritten E2, no entry.
    """
    repo, _a, _b = scenario(root)
    before = _refs(repo.path)
    convert(repo, "E2", "full")
    repo.close()
    back = [r for r in before if r.startswith("refs/")]
    if case == "parent":
        back = ["refs/vml/entries/2"]
    for ref in back:
        subprocess.run(["git", "update-ref", ref, before[ref]], cwd=root / "repo", check=True)
    return root / "repo"


@pytest.mark.parametrize("case", ["areas", "parent"])
def test_fsck_names_the_damage_in_one_line_and_gc_repair_mends_it(
    tmp_path: Path, case: str
) -> None:
    path = broken(tmp_path, case)
    a, b = tmp_path / "area A", tmp_path / "area B"
    checked = vml(path, "fsck")
    assert checked.code == 7, checked
    said = [ln for ln in checked.out.splitlines() if "no entry" in ln]
    assert said, checked.out
    for line in said:
        assert "vml gc --repair" in line, line
    assert "Traceback" not in checked.err

    mended = vml(path, "gc", "--repair")
    assert mended.code == 0, mended
    assert "numbered" in mended.out, mended.out
    clean = vml(path, "fsck")
    assert clean.code == 0, clean
    git = subprocess.run(["git", "fsck", "--full", "--strict"], cwd=path, capture_output=True)
    assert git.returncode == 0, git.stderr
    repo = open_repository(path)
    try:
        got = shape(repo, [a, b])
        assert "not an entry" not in str(got), got
        # Nothing but E-numbers was added: the old entries and their names stay.
        table = refs_mod.read_refs(repo)
        assert {1, 2, 3, 4} <= set(table.entries)
        assert table.entries[1] == table.entries[1]
    finally:
        repo.close()
    assert vml(path, "gc").code == 0
    done = vml(path, "verify", "--all", "--read-data")
    assert done.code == 0, done
    edit(a / "disk.img", 900_000, b"later")
    saved = vml(path, "commit", a, "-m", "after")
    assert saved.code == 0, saved
    st = load_state(a)
    assert st is not None
    repo = open_repository(path)
    try:
        table = refs_mod.read_refs(repo)
        assert bytes.fromhex(st.entry or "") in table.entries.values()
    finally:
        repo.close()


def test_gc_repair_on_a_sound_repository_numbers_nothing(tmp_path: Path) -> None:
    repo, _a, _b = scenario(tmp_path)
    repo.close()
    before = _refs(tmp_path / "repo")
    res = vml(tmp_path / "repo", "gc", "--repair")
    assert res.code == 0, res
    assert "numbered" not in res.out
    assert _refs(tmp_path / "repo") == before


def test_gc_repair_leaves_an_area_a_rewrite_has_still_to_move(tmp_path: Path) -> None:
    """A replayed rewrite leaves in its journal an area another command holds.

    That area holds the rewritten entry's old commit until the next command
    moves it: no lost entry.  Numbered, it came back as an entry of its own
    beside the one that replaced it (a removed one would come back so too).
    """
    repo, a, _b = scenario(tmp_path)
    old = refs_mod.read_refs(repo).entries[4]
    convert(repo, "E4", "full")
    new = refs_mod.read_refs(repo).entries[4]
    assert new != old
    # Killed before it moved area A; the next command found A held by another.
    st = load_state(a)
    assert st is not None and st.entry == new.hex()
    st.entry = old.hex()
    save_state(a, st)
    write_journal(repo, [Step(old.hex(), new.hex(), area=str(a), fields=["entry"])])
    with lock_area(a):
        assert number_unnamed(repo) == []
        assert not [u for u in find_unnamed_now(repo) if u.commit == old]
    repo.close()
    repo = open_repository(tmp_path / "repo")  # A is free: the rewrite finishes
    try:
        st = load_state(a)
        assert st is not None and st.entry == new.hex()
        assert sorted(refs_mod.read_refs(repo).entries) == [1, 2, 3, 4]
    finally:
        repo.close()


def find_unnamed_now(repo: Repository) -> list[Unnamed]:
    """What fsck would name (the repository as it is, its journal not replayed)."""
    table = refs_mod.read_refs(repo)
    reader = PackReader(repo)
    try:
        return find_unnamed(repo, reader, table, load_forest(reader, table))
    finally:
        reader.close()
