"""``vml checkout`` / ``vml restore``: exact rebuilds, in place where possible, safe refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, digest_area, edit
from vml.errors import AreaError, DirtyArea, UnknownEntry
from vml.plumbing.areas import load_state, save_state
from vml.plumbing.cache import drop_cache
from vml.plumbing.repository import Repository
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit
from vml.porcelain.names import create_branch
from vml.porcelain.status import status


def _three_entries(repo: Repository, area: Path) -> list[dict[str, tuple[object, ...]]]:
    disk = area / "disk.img"
    states = []
    (area / "vm.vmx").chmod(0o755)
    commit(repo, area)
    states.append(digest_area(area, mtimes=True))
    edit(disk, 2 * TEST_BLOCK + 4096, b"\x01" * 4096)
    (area / "notes.txt").write_text("day 1")
    commit(repo, area)
    states.append(digest_area(area, mtimes=True))
    edit(disk, 5 * TEST_BLOCK, b"\x02" * 4096)
    (area / "vm.vmx").chmod(0o644)
    (area / "vm.nvram").unlink()
    os.truncate(disk, disk.stat().st_size + TEST_BLOCK // 2)
    commit(repo, area, kind="differential")
    states.append(digest_area(area, mtimes=True))
    return states


def test_each_entry_into_a_new_folder(repo: Repository, area: Path, tmp_path: Path) -> None:
    states = _three_entries(repo, area)
    for i, want in enumerate(states, 1):
        out = tmp_path / f"e{i}"
        res = checkout(repo, f"E{i}", out)
        assert not res.in_place and res.entry == f"E{i}"
        assert digest_area(out, mtimes=True) == want
        assert status(repo, out).clean


def test_in_place_writes_only_what_differs(repo: Repository, area: Path, tmp_path: Path) -> None:
    states = _three_entries(repo, area)
    out = tmp_path / "out"
    checkout(repo, "E1", out)
    res = checkout(repo, "E2", out)
    assert res.in_place
    assert digest_area(out, mtimes=True) == states[1]
    # one 64 KiB block of the disk and the small notes file; not the whole disk
    assert res.written_bytes <= TEST_BLOCK + 100
    assert "disk.img" in res.files_written and "vm.vmx" not in res.files_written
    res = checkout(repo, "E3", out)
    assert digest_area(out, mtimes=True) == states[2]
    assert res.files_removed == ["vm.nvram"]
    assert not (out / "vm.vmx").stat().st_mode & 0o111  # mode restored
    res = checkout(repo, "E1", out)
    assert digest_area(out, mtimes=True) == states[0]
    assert (out / "vm.vmx").stat().st_mode & 0o111
    assert res.written_bytes < 3 * TEST_BLOCK
    assert res.files_removed == ["notes.txt"]


def test_restore_in_place(repo: Repository, area: Path) -> None:
    states = _three_entries(repo, area)
    res = restore(repo, "E1", area)
    assert res.in_place and digest_area(area, mtimes=True) == states[0]
    st = load_state(area)
    assert st is not None and st.entry == res.commit and st.pending is None
    assert status(repo, area).clean


def test_dirty_area_refused_then_forced(repo: Repository, area: Path) -> None:
    states = _three_entries(repo, area)
    edit(area / "disk.img", 1000, b"unsaved")
    (area / "new.txt").write_text("unsaved")
    before = digest_area(area)
    with pytest.raises(DirtyArea, match=r"disk\.img") as exc:
        restore(repo, "E1", area)
    assert "new.txt" in str(exc.value)
    assert digest_area(area) == before  # nothing touched
    res = restore(repo, "E1", area, force=True)
    # The entry's files come back; the user's new file, in no entry, stays.
    got = digest_area(area, mtimes=True)
    assert got.pop("new.txt")[0] == before["new.txt"][0]
    assert got == states[0]
    assert "new.txt" not in res.files_removed and res.left_alone == ["new.txt"]
    assert [c.path for c in status(repo, area).changes] == ["new.txt"]


def test_foreign_files_refused(repo: Repository, area: Path, tmp_path: Path) -> None:
    commit(repo, area)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(DirtyArea, match=r"precious\.txt"):
        checkout(repo, "E1", out)
    assert (out / "precious.txt").read_text() == "mine"
    assert not (out / ".vml").exists()


def test_refusals(repo: Repository, area: Path, tmp_path: Path) -> None:
    commit(repo, area)
    with pytest.raises(UnknownEntry):
        checkout(repo, "E7", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(AreaError, match="is a file"):
        checkout(repo, "E1", f)
    with pytest.raises(AreaError, match="not a VML working area"):
        restore(repo, "E1", tmp_path / "plain")
    with pytest.raises(AreaError, match="inside the repository"):
        checkout(repo, "E1", repo.path / "inside")


def test_branch_checkout_follows(repo: Repository, area: Path, tmp_path: Path) -> None:
    commit(repo, area)
    create_branch(repo, "exp", "E1", None)
    out = tmp_path / "out"
    res = checkout(repo, "exp", out)
    assert res.branch == "exp"
    edit(out / "disk.img", 0, b"x")
    e2 = commit(repo, out)
    assert e2.branch == "exp" and e2.parent == "E1"
    res = checkout(repo, "E1", out)
    assert res.branch is None
    assert load_state(out).branch is None  # type: ignore[union-attr]
    # restore keeps the branch the area follows
    checkout(repo, "exp", out)
    restore(repo, "E1", out)
    assert load_state(out).branch == "exp"  # type: ignore[union-attr]


def test_interrupted_checkout_is_finished(repo: Repository, area: Path, tmp_path: Path) -> None:
    states = _three_entries(repo, area)
    out = tmp_path / "out"
    checkout(repo, "E3", out)
    st = load_state(out)
    assert st is not None
    st.pending = st.entry  # as if a checkout of E3 stopped half way
    save_state(out, st)
    edit(out / "disk.img", 0, b"half written")
    (out / "notes.txt").unlink()
    assert not status(repo, out).clean
    checkout(repo, "E3", out)
    assert digest_area(out, mtimes=True) == states[2]
    assert load_state(out).pending is None  # type: ignore[union-attr]


def test_without_the_area_cache(repo: Repository, area: Path, tmp_path: Path) -> None:
    """The cache is an accelerator: without it, checkout still removes what the entry lacks."""
    states = _three_entries(repo, area)
    drop_cache(area)
    res = restore(repo, "E1", area)
    assert not res.in_place
    assert "notes.txt" in res.files_removed
    assert digest_area(area, mtimes=True) == states[0]
    assert status(repo, area).clean
    drop_cache(area)
    edit(area / "disk.img", 0, b"dirty")
    with pytest.raises(DirtyArea, match=r"disk\.img"):
        restore(repo, "E2", area)


def test_folder_replaced_by_a_file(repo: Repository, area: Path) -> None:
    (area / "sub").write_text("a file")
    commit(repo, area)
    want = digest_area(area)
    (area / "sub").unlink()
    (area / "sub").mkdir()
    (area / "sub" / "x").write_text("now a folder")
    commit(repo, area)
    restore(repo, "E1", area)
    assert digest_area(area) == want
    restore(repo, "E2", area)
    assert (area / "sub" / "x").read_text() == "now a folder"
