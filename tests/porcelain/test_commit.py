"""``vml commit``: kinds and parents, nothing-to-commit, tags, branches, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import TEST_BLOCK, edit
from vml.errors import AreaError, NothingToCommit, UsageError, VMRunning
from vml.plumbing import refs
from vml.plumbing.areas import load_state, save_state
from vml.plumbing.repository import Repository
from vml.porcelain.checkout import restore
from vml.porcelain.commit import commit
from vml.porcelain.log import log
from vml.porcelain.names import create_branch


def _packs(repo: Repository) -> set[str]:
    return {p.name for p in (repo.objects_dir / "pack").glob("*")}


def _parents(repo: Repository) -> dict[str, str | None]:
    return {i: le.parent for i, le in log(repo).entries.items()}


def test_kinds_and_parents(repo: Repository, area: Path) -> None:
    disk = area / "disk.img"
    e1 = commit(repo, area, message="fresh", kind="incremental")
    assert (e1.entry, e1.kind, e1.parent) == ("E1", "full", None)  # a first save is full
    assert e1.changed_files == ["disk.img", "vm.nvram", "vm.vmx"]
    edit(disk, 0, b"a" * 4096)
    e2 = commit(repo, area)
    assert (e2.entry, e2.kind, e2.parent) == ("E2", "incremental", "E1")
    assert e2.stored_bytes < TEST_BLOCK // 4
    edit(disk, 4096, b"b" * 4096)
    e3 = commit(repo, area, kind="differential")
    assert (e3.kind, e3.parent) == ("differential", "E1")
    edit(disk, 8192, b"c" * 4096)
    e4 = commit(repo, area, base="E2")
    assert (e4.kind, e4.parent) == ("differential", "E2")
    edit(disk, 12288, b"d" * 4096)
    e5 = commit(repo, area, kind="full")
    assert (e5.kind, e5.parent) == ("full", None)
    assert e5.read_bytes >= 150_000  # a full entry reads every data block
    edit(disk, 16384, b"e" * 4096)
    e6 = commit(repo, area, kind="differential")
    assert e6.parent == "E5"  # the root of the area's chain is now E5
    assert _parents(repo) == {
        "E1": None,
        "E2": "E1",
        "E3": "E1",
        "E4": "E2",
        "E5": None,
        "E6": "E5",
    }


def test_unchanged_area_makes_no_entry(repo: Repository, area: Path) -> None:
    commit(repo, area)
    packs = _packs(repo)
    os.utime(area / "disk.img")  # a touch is not a change
    with pytest.raises(NothingToCommit, match="nothing changed"):
        commit(repo, area)
    with pytest.raises(NothingToCommit):
        commit(repo, area, kind="differential")
    assert _packs(repo) == packs  # nothing written
    assert list(refs.read_refs(repo).entries) == [1]
    e2 = commit(repo, area, allow_empty=True, message="same again")
    assert e2.entry == "E2" and e2.changed_files == []


def test_file_set_and_mode_changes(repo: Repository, area: Path) -> None:
    commit(repo, area)
    (area / "notes.txt").write_text("new")
    (area / "vm.nvram").unlink()
    (area / "empty").mkdir()
    res = commit(repo, area)
    assert res.changed_files == ["empty", "notes.txt", "vm.nvram"]
    (area / "vm.vmx").chmod(0o755)
    assert commit(repo, area).changed_files == ["vm.vmx"]


def test_base_rules(repo: Repository, area: Path) -> None:
    with pytest.raises(UsageError, match="first save"):
        commit(repo, area, base="E1")
    commit(repo, area)
    edit(area / "disk.img", 0, b"x")
    with pytest.raises(UsageError, match="--base goes with --differential"):
        commit(repo, area, kind="full", base="E1")
    with pytest.raises(UsageError, match="--base goes with --differential"):
        commit(repo, area, kind="incremental", base="E1")
    with pytest.raises(UsageError, match="unknown entry kind"):
        commit(repo, area, kind="weekly")
    from vml.errors import UnknownEntry

    with pytest.raises(UnknownEntry):
        commit(repo, area, base="E9")
    assert list(refs.read_refs(repo).entries) == [1]


def test_tags(repo: Repository, area: Path) -> None:
    e1 = commit(repo, area, tag="clean-install")
    assert e1.tag == "clean-install"
    assert refs.resolve_name(repo, "clean-install").hex() == e1.commit
    edit(area / "disk.img", 0, b"x")
    with pytest.raises(UsageError, match="exists already"):
        commit(repo, area, tag="clean-install")
    with pytest.raises(UsageError, match="not a valid tag"):
        commit(repo, area, tag="E5")
    assert list(refs.read_refs(repo).entries) == [1]


def test_branch_follows_the_area(repo: Repository, area: Path) -> None:
    e1 = commit(repo, area)
    info = create_branch(repo, "main", None, area)
    assert info.current and load_state(area).branch == "main"  # type: ignore[union-attr]
    edit(area / "disk.img", 0, b"x")
    e2 = commit(repo, area)
    assert e2.branch == "main"
    t = refs.read_refs(repo)
    assert t.branches["main"].hex() == e2.commit
    assert e1.commit != e2.commit


def test_restore_then_commit_branches_the_tree(repo: Repository, area: Path) -> None:
    disk = area / "disk.img"
    for i in range(4):
        edit(disk, i * 4096, bytes([i + 1]) * 4096)
        commit(repo, area)  # E1 .. E4
    edit(disk, 100_000, b"five")
    assert commit(repo, area).entry == "E5"
    restore(repo, "E4", area)
    edit(disk, 100_000, b"six!")
    e6 = commit(repo, area)
    assert (e6.entry, e6.parent) == ("E6", "E4")
    parents = _parents(repo)
    assert parents["E5"] == "E4" and parents["E6"] == "E4"
    assert sorted(log(repo).entries["E4"].children) == ["E5", "E6"]


def test_refusals_change_nothing(repo: Repository, area: Path, tmp_path: Path) -> None:
    with pytest.raises(AreaError, match="no working area"):
        commit(repo, tmp_path / "missing")
    (area / "vm.vmx.lck").mkdir()
    with pytest.raises(VMRunning, match="lck"):
        commit(repo, area)
    assert refs.read_refs(repo).entries == {}
    assert not (area / ".vml" / "area.json").exists()
    res = commit(repo, area, force_running=True)
    assert res.crash_consistent
    (area / "vm.vmx.lck").rmdir()
    inside = repo.path / "area"
    inside.mkdir()
    (inside / "f").write_text("x")
    with pytest.raises(AreaError, match="inside the repository"):
        commit(repo, inside)


def test_interrupted_checkout_blocks_commit(repo: Repository, area: Path) -> None:
    e1 = commit(repo, area)
    st = load_state(area)
    assert st is not None
    st.pending = e1.commit
    save_state(area, st)
    with pytest.raises(AreaError, match="interrupted"):
        commit(repo, area, allow_empty=True)


def _save_with(
    tmp_path: Path, name: str, area: Path, near_end: int | None, monkeypatch: pytest.MonkeyPatch
) -> tuple[Repository, bytes, int, int]:
    """A first save of a copy of ``area`` into a repository of its own; (repo, images tree, stored, packs).

    ``near_end``: the data left when the writer is told (None: never told).
    """
    import json
    import shutil
    import subprocess

    from vml.plumbing import saving
    from vml.plumbing.repository import init_repository

    copy = tmp_path / f"{name}-area"
    shutil.copytree(area, copy)
    repo = init_repository(tmp_path / name, TEST_BLOCK)
    with monkeypatch.context() as mp:
        if near_end is None:
            mp.setattr(saving.Saver, "_near_end", lambda self: None)
        else:
            mp.setattr(saving, "NEAR_END", near_end)
        res = commit(repo, copy)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo.path), *args], capture_output=True, text=True, check=True
        ).stdout

    tree = git("rev-parse", f"{res.commit}^{{tree}}:images").strip()
    stored = json.loads(git("show", f"{res.commit}:vml-entry.json"))["stats"]["stored_bytes"]
    packs = list((repo.objects_dir / "pack").glob("*.idx"))
    for p in packs:
        subprocess.run(["git", "verify-pack", str(p)], check=True)
    return repo, tree.encode(), stored, len(packs)


def _packs_of(repo: Repository, *blocks: bytes) -> list[int]:
    """The pack each of ``blocks`` is stored in (as a blob), by its number in a reader."""
    from vml.plumbing.packreader import PackReader, blob_id

    reader = PackReader(repo)
    try:
        return [reader.position(blob_id(b))[0] for b in blocks]
    finally:
        reader.close()


def _restores_as_saved(repo: Repository, area: Path, out: Path, names: tuple[str, ...]) -> None:
    """E1 checked out to ``out`` holds ``names`` as ``area`` does."""
    from vml.porcelain.checkout import checkout

    checkout(repo, "E1", out)
    for name in names:
        assert (out / name).read_bytes() == (area / name).read_bytes()


def test_a_big_save_seals_its_packs_before_its_end_into_the_same_entry(
    tmp_path: Path, area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A save that rolled over into a second pack seals it before its last
    # bytes are saved (PackWriter.near_end): one more pack, the same objects.
    from vml.plumbing import packwriter

    monkeypatch.setattr(packwriter, "_ROLL_BYTES", 200 << 10)  # four 64 KiB blocks
    # 14 blocks of data: packs of 4 blocks, and the last pack holds two blocks
    # and the trees, unless the writer is told it nears the end (one block left).
    (area / "disk.img").write_bytes(os.urandom(14 * TEST_BLOCK))
    plain, tree, stored, n = _save_with(tmp_path, "plain", area, None, monkeypatch)
    early, tree2, stored2, n2 = _save_with(tmp_path, "early", area, 100 << 10, monkeypatch)
    assert (tree2, stored2) == (tree, stored) and n2 == n + 1
    _restores_as_saved(early, area, tmp_path / "out", ("disk.img", "vm.nvram", "vm.vmx"))
    plain.close()
    early.close()


def test_a_big_save_nears_its_end_by_the_data_left_not_the_sizes(
    tmp_path: Path, area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last file is mostly holes (a memory file of a guest that used
    # little): its two blocks of data are what is left once the disk is
    # read, so the pack holding the disk's last blocks is sealed then, while
    # they are saved, and they go into the last pack. Counted in file sizes,
    # the end came only past the holes: one pack for all, sealed at the end.
    from vml.plumbing import packwriter, saving
    from vml.plumbing.repository import init_repository

    monkeypatch.setattr(packwriter, "_ROLL_BYTES", 190 << 10)  # three 64 KiB blocks
    monkeypatch.setattr(saving, "NEAR_END", 160 << 10)
    disk = os.urandom(5 * TEST_BLOCK)
    (area / "disk.img").write_bytes(disk)
    mem = os.urandom(2 * TEST_BLOCK)
    with open(area / "x.img", "wb") as f:
        f.write(mem)
        f.truncate(200 * TEST_BLOCK)
    repo = init_repository(tmp_path / "r", TEST_BLOCK)
    commit(repo, area)

    last_disk, before, saved_last = _packs_of(
        repo, disk[4 * TEST_BLOCK :], disk[3 * TEST_BLOCK : 4 * TEST_BLOCK], mem[:TEST_BLOCK]
    )
    assert before == last_disk
    assert saved_last != last_disk
    assert len(list((repo.objects_dir / "pack").glob("*.idx"))) == 3
    _restores_as_saved(repo, area, tmp_path / "out", ("disk.img", "x.img", "vm.nvram", "vm.vmx"))
    repo.close()


def test_a_big_save_seals_the_pack_it_fills_once_the_rest_takes_as_long(
    tmp_path: Path, area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sealing hashes a pack faster than the workers save data: the pack
    # being filled is sealed once what is left is two thirds of it, even
    # where that is more than NEAR_END (here nothing), so its seal ends
    # with the save's last blocks instead of after them.
    from vml.plumbing import packwriter, saving
    from vml.plumbing.repository import init_repository

    monkeypatch.setattr(packwriter, "_ROLL_BYTES", 190 << 10)  # three 64 KiB blocks
    monkeypatch.setattr(saving, "NEAR_END", 0)
    # Packs of disk blocks 1-3 and 4-6; blocks 7-8 fill the third, and the
    # one block of data left (x.img, saved last) is less than two thirds of it.
    disk = os.urandom(8 * TEST_BLOCK)
    (area / "disk.img").write_bytes(disk)
    last = os.urandom(TEST_BLOCK)
    with open(area / "x.img", "wb") as f:
        f.write(last)
        f.truncate(2 * TEST_BLOCK)
    repo = init_repository(tmp_path / "r", TEST_BLOCK)
    commit(repo, area)

    filled, before, saved_last = _packs_of(
        repo, disk[7 * TEST_BLOCK :], disk[6 * TEST_BLOCK : 7 * TEST_BLOCK], last
    )
    assert before == filled
    assert saved_last != filled
    assert len(list((repo.objects_dir / "pack").glob("*.idx"))) == 4
    _restores_as_saved(repo, area, tmp_path / "out", ("disk.img", "x.img", "vm.nvram", "vm.vmx"))
    repo.close()
