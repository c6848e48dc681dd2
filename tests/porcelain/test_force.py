"""What ``--force`` may touch: only what VML put there.

A checkout or restore removes or overwrites only the paths the target entry
writes and those the area's recorded entry (or a killed checkout's entry)
held.  Every other file is left as it was, byte for byte and mtime, and
listed; a user's file or folder in the way of the entry is refused before
anything changes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_BLOCK, digest_area
from vml.errors import AreaError, DirtyArea
from vml.plumbing.areas import load_state, save_state
from vml.plumbing.repository import Repository, init_repository
from vml.porcelain.checkout import checkout, restore
from vml.porcelain.commit import commit

# No name is a folder of another: conflicts are tested on their own below.
POOL = ("vm.vmx", "disk.img", "sub/a.txt", "sub/deep/b.txt", ".hidden", ".x.vml-tmp", "z")
USER_ONLY = ("mine.txt", "sub/mine.txt", "other/mine.bin", "vmware.log")


def _write_set(folder: Path, names: set[str], tag: bytes) -> None:
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        size = 2 * TEST_BLOCK + 1 if n == "disk.img" else 100
        p.write_bytes((tag + n.encode()) * (size // (len(tag) + len(n)) + 1))


def _entry(
    repo: Repository, area: Path, names: set[str], tag: bytes
) -> tuple[str, dict[str, tuple[object, ...]]]:
    for p in sorted(area.iterdir()):
        if p.name != ".vml":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    _write_set(area, names, tag)
    res = commit(repo, area, allow_empty=True)
    return res.entry, digest_area(area, mtimes=True)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    first=st.sets(st.sampled_from(POOL), min_size=1),
    second=st.sets(st.sampled_from(POOL), min_size=1),
    user=st.sets(st.sampled_from(POOL + USER_ONLY)),
    how=st.sampled_from(["area", "plain", "pending"]),
)
def test_force_touches_only_what_vml_put_there(
    first: set[str], second: set[str], user: set[str], how: str
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vml-force-"))
    repo = init_repository(tmp / "repo", TEST_BLOCK)
    try:
        area = tmp / "area"
        area.mkdir()
        e1, _ = _entry(repo, area, first, b"one:")
        e2, want2 = _entry(repo, area, second, b"two:")
        out = tmp / "out"
        claimed: set[str] = set()
        if how in ("area", "pending"):
            checkout(repo, e1, out)
            claimed = set(first)
            if how == "pending":  # as if a checkout of E2 had been killed half way
                st = load_state(out)
                assert st is not None
                st.pending = want_commit = repo.git.refs[
                    f"refs/vml/entries/{e2[1:]}".encode()
                ].decode()
                save_state(out, st)
                assert want_commit
                claimed |= second
        else:
            out.mkdir()
        _write_set(out, user, b"user:")
        before = digest_area(out, mtimes=True)
        res = checkout(repo, e2, out, force=True)
        after = digest_area(out, mtimes=True)
        mine = {p for p in user if p not in claimed and p not in second}
        for p in mine:
            assert after[p] == before[p], f"{p} was touched"
        # Listed, but for what the default ignore rules hide (hypervisor logs).
        assert sorted(mine - {"vmware.log"}) == res.left_alone
        for p in second:
            assert after[p] == want2[p]
        assert set(after) == set(second) | mine
        assert set(res.files_removed) <= claimed - second
    finally:
        repo.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_restore_force_keeps_a_file_the_entry_ignores(repo: Repository, area: Path) -> None:
    """The report: `restore -f` deleted a file the entry's own .vmlignore ignores."""
    (area / ".vmlignore").write_text("scratch/\n")
    (area / "scratch").mkdir()
    (area / "scratch" / "results.dat").write_text("three weeks of fitting")
    commit(repo, area)
    (area / ".vmlignore").unlink()  # the rule is gone; the file is still no entry's
    (area / "vm.vmx").write_text("edited\n")
    res = restore(repo, "E1", area, force=True)
    assert (area / "scratch" / "results.dat").read_text() == "three weeks of fitting"
    assert res.left_alone == ["scratch/results.dat"]
    assert (area / ".vmlignore").read_text() == "scratch/\n"


def test_force_into_a_plain_folder_replaces_only_the_entry_s_files(
    repo: Repository, area: Path, tmp_path: Path
) -> None:
    commit(repo, area)
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    (out / "vm.vmx").write_text("an older copy")
    with pytest.raises(DirtyArea):
        checkout(repo, "E1", out)
    res = checkout(repo, "E1", out, force=True)
    assert (out / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8 cat"
    assert (out / "vm.vmx").read_text() == (area / "vm.vmx").read_text()
    assert res.left_alone == ["photos/cat.jpg"] and res.files_removed == []


@pytest.mark.parametrize("blocker", ["folder-for-file", "file-for-folder", "link-for-folder"])
def test_a_user_s_path_in_the_way_is_refused_before_anything_changes(
    repo: Repository, area: Path, tmp_path: Path, blocker: str
) -> None:
    (area / "sub").mkdir()
    (area / "sub" / "x.txt").write_text("entry")
    commit(repo, area)
    out = tmp_path / "out"
    out.mkdir()
    if blocker == "folder-for-file":  # the entry has a file vm.vmx; the user a folder
        (out / "vm.vmx").mkdir()
        (out / "vm.vmx" / "keep.txt").write_text("mine")
    elif blocker == "file-for-folder":  # the entry has a folder sub/; the user a file
        (out / "sub").write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", out / "sub")
    before = digest_area(out, mtimes=True)
    with pytest.raises(AreaError, match=r"in the way|symbolic link"):
        checkout(repo, "E1", out, force=True)
    assert digest_area(out, mtimes=True) == before
    assert not (out / ".vml").exists()
    if blocker == "link-for-folder":
        assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_folder_of_removed_files_may_become_a_file(repo: Repository, area: Path) -> None:
    (area / "data").mkdir()
    (area / "data" / "part1").write_text("1")
    commit(repo, area)
    shutil.rmtree(area / "data")
    (area / "data").write_text("now one file")
    commit(repo, area)
    restore(repo, "E1", area)
    res = restore(repo, "E2", area)
    assert (area / "data").read_text() == "now one file"
    assert res.files_removed == ["data/part1"]
